//! The operators' program store: writes core data to Redis atomically and
//! versioned, publishing each change so running trackers apply it at once.
//! The layout and scripts are the contract in `adtrack_proto::redis_layout`.

use adtrack_proto::program::{Program, ProgramId};
use adtrack_proto::redis_layout::{
    CHANGES_CHANNEL, DELETE_SCRIPT, StoredProgram, UPSERT_SCRIPT, VERSION_KEY, program_key,
};
use anyhow::{Context, Result};
use redis::aio::MultiplexedConnection;

/// What happened to one program write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written and published with this version.
    Written(u64),
    /// Not written: Redis already holds this newer (or equal) version.
    Stale(u64),
}

/// What one delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The program was deleted; its tombstone has this version.
    Deleted(u64),
    /// There was no such program; a tombstone with this version now says
    /// so, and a later write of an older version is refused.
    Tombstoned(u64),
    /// It was deleted before, at this version; nothing changed.
    AlreadyDeleted(u64),
}

/// A connection to the program store.
pub struct ProgramStore {
    conn: MultiplexedConnection,
    upsert_sha: String,
    delete_sha: String,
}

impl ProgramStore {
    /// Connects and loads the write scripts.
    pub async fn connect(url: &str) -> Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("bad Redis URL {url}"))?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("cannot connect to Redis at {url}"))?;
        let upsert_sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(UPSERT_SCRIPT)
            .query_async(&mut conn)
            .await
            .context("SCRIPT LOAD")?;
        let delete_sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(DELETE_SCRIPT)
            .query_async(&mut conn)
            .await
            .context("SCRIPT LOAD")?;
        Ok(Self {
            conn,
            upsert_sha,
            delete_sha,
        })
    }

    fn upsert_cmd(&self, program: &Program) -> redis::Cmd {
        let mut unversioned = program.clone();
        unversioned.version = 0;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.upsert_sha)
            .arg(2)
            .arg(program_key(&program.program_id))
            .arg(VERSION_KEY)
            .arg(program.version)
            .arg(CHANGES_CHANNEL)
            .arg(unversioned.to_json().to_string());
        for (field, value) in program.to_redis_fields() {
            cmd.arg(field).arg(value);
        }
        cmd
    }

    /// Writes all programs in one `MULTI`/`EXEC`: applied whole or not at all.
    /// Returns one outcome per program, in order.
    pub async fn load(&mut self, programs: &[Program]) -> Result<Vec<WriteOutcome>> {
        if programs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for p in programs {
            pipe.add_command(self.upsert_cmd(p));
        }
        let replies: Vec<(i64, u64)> = pipe
            .query_async(&mut self.conn)
            .await
            .context("writing programs to Redis")?;
        Ok(replies.into_iter().map(outcome).collect())
    }

    /// Writes one program.
    pub async fn put(&mut self, program: &Program) -> Result<WriteOutcome> {
        let reply: (i64, u64) = self
            .upsert_cmd(program)
            .query_async(&mut self.conn)
            .await
            .context("writing program to Redis")?;
        Ok(outcome(reply))
    }

    /// Deletes a program, leaving a versioned tombstone (also when there
    /// was no such program), and publishes the deletion.
    pub async fn delete(&mut self, id: &ProgramId) -> Result<DeleteOutcome> {
        let id_json = serde_json::Value::String(id.to_string()).to_string();
        let (done, version, existed): (i64, u64, i64) = redis::cmd("EVALSHA")
            .arg(&self.delete_sha)
            .arg(2)
            .arg(program_key(id))
            .arg(VERSION_KEY)
            .arg(CHANGES_CHANNEL)
            .arg(id_json)
            .query_async(&mut self.conn)
            .await
            .context("deleting program in Redis")?;
        Ok(match (done, existed) {
            (0, _) => DeleteOutcome::AlreadyDeleted(version),
            (_, 1) => DeleteOutcome::Deleted(version),
            _ => DeleteOutcome::Tombstoned(version),
        })
    }

    /// Reads one program as stored.
    pub async fn get(&mut self, id: &ProgramId) -> Result<StoredProgram> {
        let fields: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(program_key(id))
            .query_async(&mut self.conn)
            .await
            .context("reading program from Redis")?;
        StoredProgram::from_hash(&fields).map_err(|e| anyhow::anyhow!("stored program {id}: {e}"))
    }
}

fn outcome((written, version): (i64, u64)) -> WriteOutcome {
    if written == 1 {
        WriteOutcome::Written(version)
    } else {
        WriteOutcome::Stale(version)
    }
}
