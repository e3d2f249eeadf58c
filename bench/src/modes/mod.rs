//! The modes, one module per subcommand: each holds its flags, its report
//! and its `run`.

pub mod compare;
pub mod consumer;
pub mod e2e;
pub mod load;
pub mod max;
pub mod seed;
pub mod startup;
pub mod update_latency;
