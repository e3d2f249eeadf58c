//! `e2e`: a `load` run through the whole stack, then every answered event
//! accounted for (see `crate::accounting`).

use std::path::Path;

use anyhow::Result;

use super::load::{LoadArgs, run_load};

pub async fn run(stack_env: &Path, out: &Path, a: LoadArgs) -> Result<()> {
    run_load(stack_env, out, a, true).await
}
