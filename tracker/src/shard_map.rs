//! Which shard each partition key lands on: the open shards' hash-key
//! ranges from ListShards, searched by the MD5 of the key, as Kinesis does.
//! Refreshed periodically and whenever Kinesis puts a record on a shard we
//! did not expect (a reshard happened).

use adtrack_proto::kpl::partition_hash;
use aws_sdk_kinesis::Client;

/// One open shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub id: String,
    pub start: u128,
    pub end: u128,
}

impl Shard {
    /// An explicit hash key inside this shard (its first hash key), for
    /// aggregates that must land here.
    pub fn explicit_hash_key(&self) -> String {
        self.start.to_string()
    }
}

/// The open shards, sorted by their hash-key ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardMap {
    shards: Vec<Shard>,
}

impl ShardMap {
    pub fn new(mut shards: Vec<Shard>) -> Self {
        shards.sort_by_key(|s| s.start);
        Self { shards }
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub fn shard(&self, index: usize) -> &Shard {
        &self.shards[index]
    }

    /// `n` shards splitting the hash-key space evenly, as a new stream's do.
    #[cfg(test)]
    pub fn even(n: u128) -> Self {
        let width = u128::MAX / n;
        Self::new(
            (0..n)
                .map(|i| Shard {
                    id: format!("shard-{i}"),
                    start: i * width,
                    end: if i + 1 == n {
                        u128::MAX
                    } else {
                        (i + 1) * width - 1
                    },
                })
                .collect(),
        )
    }

    /// Index of the shard a partition key hashes to.
    pub fn index_for(&self, partition_key: &str) -> usize {
        self.index_for_hash(partition_hash(partition_key))
    }

    /// Index of the shard owning a 128-bit hash key.
    pub fn index_for_hash(&self, hash: u128) -> usize {
        let i = self.shards.partition_point(|s| s.end < hash);
        i.min(self.shards.len().saturating_sub(1))
    }

    /// Reads the stream's open shards.
    pub async fn fetch(client: &Client, stream: &str) -> anyhow::Result<Self> {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = client.list_shards();
            let req = match &token {
                Some(t) => req.next_token(t),
                None => req.stream_name(stream),
            };
            let out = req.send().await.map_err(|e| {
                anyhow::anyhow!("{}", aws_sdk_kinesis::error::DisplayErrorContext(&e))
            })?;
            for s in out.shards() {
                let open = s
                    .sequence_number_range()
                    .is_none_or(|r| r.ending_sequence_number().is_none());
                if !open {
                    continue;
                }
                let Some(range) = s.hash_key_range() else {
                    continue;
                };
                let (Ok(start), Ok(end)) = (
                    range.starting_hash_key().parse::<u128>(),
                    range.ending_hash_key().parse::<u128>(),
                ) else {
                    continue;
                };
                shards.push(Shard {
                    id: s.shard_id().to_owned(),
                    start,
                    end,
                });
            }
            token = out.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        if shards.is_empty() {
            anyhow::bail!("stream {stream} has no open shards");
        }
        Ok(Self::new(shards))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_the_shard_owning_their_hash() {
        let half = u128::MAX / 2;
        let map = ShardMap::new(vec![
            Shard {
                id: "b".into(),
                start: half + 1,
                end: u128::MAX,
            },
            Shard {
                id: "a".into(),
                start: 0,
                end: half,
            },
        ]);
        for i in 0..1000 {
            let key = format!("key-{i}");
            let h = partition_hash(&key);
            let s = map.shard(map.index_for(&key));
            assert!(s.start <= h && h <= s.end, "{key}");
        }
        assert_eq!(map.shard(0).explicit_hash_key(), "0");
    }
}
