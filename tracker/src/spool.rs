//! The disk spool: where events go when the in-memory queue is past its
//! bound or Kinesis is unreachable, and where they are read back, in order,
//! once Kinesis answers again.
//!
//! Layout: a directory of segment files `{id:020}.spool`, appended to in
//! order. Each entry is framed as
//!
//! ```text
//! u32 LE payload length | u32 LE CRC-32 of the payload | payload
//! payload = u16 LE partition-key length | partition key | event bytes
//! ```
//!
//! Entries are appended with one `write` call per group (the spool writer
//! thread's group commit), so a killed process leaves at most a torn tail;
//! on open, every segment is scanned and cut at the first entry whose
//! length or checksum does not hold. A segment is
//! deleted once every entry in it is delivered; when all are delivered the
//! spool is left empty. Entries read back but not yet acknowledged when the
//! process dies are read again on the next start (at least once; the
//! consumer deduplicates by event id). The directory is locked so two
//! trackers never share it.
//!
//! No crate fits this job as asked (a bounded, segmented, checksummed FIFO
//! that survives a killed writer and is read while written); it is small.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::outgoing::Outgoing;

const HEADER: usize = 8;
/// Largest payload accepted (Kinesis's own record bound).
pub const MAX_ENTRY: usize = 1024 * 1024;

/// Identifies the segment an entry was read from, for acknowledgement.
pub type SegmentId = u64;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full")]
    Full,
    #[error("spool I/O: {0}")]
    Io(#[from] io::Error),
}

/// What opening the spool found on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    pub entries: u64,
    /// Bytes cut from torn or corrupt tails.
    pub truncated_bytes: u64,
}

#[derive(Debug, Default)]
struct Segment {
    bytes: u64,
    written: u64,
    read: u64,
    acked: u64,
    sealed: bool,
}

struct Writer {
    id: SegmentId,
    file: File,
    len: u64,
}

struct ReadPos {
    id: SegmentId,
    offset: u64,
}

/// A bounded, crash-safe FIFO of events on disk.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    writer: Mutex<Writer>,
    segments: Mutex<BTreeMap<SegmentId, Segment>>,
    reader: Mutex<ReadPos>,
    total_bytes: AtomicU64,
    unacked: AtomicU64,
    /// Bytes and events promised to writes not yet made (see [`Self::reserve`]).
    reserved: AtomicU64,
    queued: AtomicU64,
    _lock: File,
}

fn segment_path(dir: &Path, id: SegmentId) -> PathBuf {
    dir.join(format!("{id:020}.spool"))
}

fn frame(pk: &str, data: &[u8]) -> Vec<u8> {
    let payload_len = 2 + pk.len() + data.len();
    let mut buf = Vec::with_capacity(HEADER + payload_len);
    buf.extend_from_slice(&(payload_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&(pk.len() as u16).to_le_bytes());
    buf.extend_from_slice(pk.as_bytes());
    buf.extend_from_slice(data);
    let crc = crc32fast::hash(&buf[HEADER..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// Parses complete, valid entries from `buf`; returns them and the bytes used.
fn parse_entries(buf: &[u8], max: usize) -> (Vec<Outgoing>, usize, bool) {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut corrupt = false;
    while out.len() < max && buf.len() - pos >= HEADER {
        let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().unwrap_or_default());
        if !(2..=MAX_ENTRY + 2 + 256).contains(&len) {
            corrupt = true;
            break;
        }
        if buf.len() - pos - HEADER < len {
            break; // incomplete
        }
        let payload = &buf[pos + HEADER..pos + HEADER + len];
        if crc32fast::hash(payload) != crc {
            corrupt = true;
            break;
        }
        let pk_len = u16::from_le_bytes([payload[0], payload[1]]) as usize;
        let Some(pk) = payload
            .get(2..2 + pk_len)
            .and_then(|b| std::str::from_utf8(b).ok())
        else {
            corrupt = true;
            break;
        };
        out.push(Outgoing {
            partition_key: pk.to_owned(),
            data: Bytes::copy_from_slice(&payload[2 + pk_len..]),
        });
        pos += HEADER + len;
    }
    (out, pos, corrupt)
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering what a previous
    /// process left: torn tails are cut, every remaining entry is pending.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Self, Recovery), SpoolError> {
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))?;
        if lock.try_lock().is_err() {
            return Err(SpoolError::Io(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "spool directory {} is in use by another tracker",
                    dir.display()
                ),
            )));
        }
        let mut ids: Vec<SegmentId> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".spool")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut recovery = Recovery::default();
        let mut segments = BTreeMap::new();
        let mut total = 0;
        let mut unacked = 0;
        for id in &ids {
            let path = segment_path(dir, *id);
            let mut buf = Vec::new();
            File::open(&path)?.read_to_end(&mut buf)?;
            let (entries, used, _) = parse_entries(&buf, usize::MAX);
            if used < buf.len() {
                recovery.truncated_bytes += (buf.len() - used) as u64;
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(used as u64)?;
                f.sync_all()?;
            }
            if entries.is_empty() {
                std::fs::remove_file(&path)?;
                continue;
            }
            recovery.segments += 1;
            recovery.entries += entries.len() as u64;
            total += used as u64;
            unacked += entries.len() as u64;
            segments.insert(
                *id,
                Segment {
                    bytes: used as u64,
                    written: entries.len() as u64,
                    sealed: true,
                    ..Segment::default()
                },
            );
        }
        let next = ids.last().map_or(1, |l| l + 1);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, next))?;
        segments.insert(next, Segment::default());
        let first = *segments.keys().next().unwrap_or(&next);
        let spool = Self {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes: segment_bytes.max(4096),
            writer: Mutex::new(Writer {
                id: next,
                file,
                len: 0,
            }),
            segments: Mutex::new(segments),
            reader: Mutex::new(ReadPos {
                id: first,
                offset: 0,
            }),
            total_bytes: AtomicU64::new(total),
            unacked: AtomicU64::new(unacked),
            reserved: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            _lock: lock,
        };
        Ok((spool, recovery))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Events written and not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.unacked.load(Ordering::Acquire)
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.total_bytes.load(Ordering::Acquire)
    }

    /// Bytes `events` take on disk.
    pub fn framed_len(events: &[Outgoing]) -> u64 {
        events
            .iter()
            .map(|e| (HEADER + 2 + e.partition_key.len() + e.data.len()) as u64)
            .sum()
    }

    /// Promises room for a later [`Self::write_reserved`] of `bytes`
    /// (`events` events), within the bound; false when the spool is full.
    pub fn reserve(&self, bytes: u64, events: u64) -> bool {
        let before = self.reserved.fetch_add(bytes, Ordering::AcqRel);
        if self.total_bytes.load(Ordering::Acquire) + before + bytes > self.max_bytes {
            self.reserved.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        self.queued.fetch_add(events, Ordering::AcqRel);
        true
    }

    /// Events reserved for and not yet written.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Acquire)
    }

    /// Writes events room was reserved for (`bytes`, as reserved), all or
    /// none; the reservation is given back either way.
    pub fn write_reserved(&self, events: &[Outgoing], bytes: u64) -> Result<(), SpoolError> {
        let result = self.write(events, false);
        self.reserved.fetch_sub(bytes, Ordering::AcqRel);
        self.queued.fetch_sub(events.len() as u64, Ordering::AcqRel);
        result
    }

    /// Appends events, all or none (the bound is checked for the whole set).
    pub fn append_all(&self, events: &[Outgoing]) -> Result<(), SpoolError> {
        self.write(events, true)
    }

    fn write(&self, events: &[Outgoing], check_bound: bool) -> Result<(), SpoolError> {
        let frames: Vec<Vec<u8>> = events
            .iter()
            .map(|e| frame(&e.partition_key, &e.data))
            .collect();
        let size: u64 = frames.iter().map(|f| f.len() as u64).sum();
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if check_bound
            && self.total_bytes.load(Ordering::Acquire)
                + self.reserved.load(Ordering::Acquire)
                + size
                > self.max_bytes
        {
            return Err(SpoolError::Full);
        }
        if w.len > 0 && w.len + size > self.segment_bytes {
            self.roll(&mut w)?;
        }
        let mut all = Vec::with_capacity(size as usize);
        for f in &frames {
            all.extend_from_slice(f);
        }
        if let Err(e) = w.file.write_all(&all) {
            // Whatever part reached the file is cut on the next open (bad CRC
            // or short tail); undo our view of it now.
            let _ = w.file.set_len(w.len);
            return Err(e.into());
        }
        w.len += size;
        self.total_bytes.fetch_add(size, Ordering::AcqRel);
        let mut segs = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        let seg = segs.entry(w.id).or_default();
        seg.bytes = w.len;
        seg.written += events.len() as u64;
        self.unacked
            .fetch_add(events.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    fn roll(&self, w: &mut Writer) -> io::Result<()> {
        w.file.sync_data()?;
        let next = w.id + 1;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.dir, next))?;
        let mut segs = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = segs.get_mut(&w.id) {
            s.sealed = true;
        }
        segs.insert(next, Segment::default());
        let old = w.id;
        *w = Writer {
            id: next,
            file,
            len: 0,
        };
        Self::collect(&self.dir, &mut segs, old, &self.total_bytes);
        Ok(())
    }

    /// Holds the file as a stalled write would (tests).
    #[cfg(test)]
    pub(crate) fn hold_file_for_test(&self) -> impl Sized + '_ {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flushes the active segment to stable storage.
    pub fn sync(&self) -> io::Result<()> {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.file.sync_data()
    }

    /// Reads up to `max_entries` entries not yet read, in order.
    pub fn read_batch(&self, max_entries: usize) -> Result<Vec<(SegmentId, Outgoing)>, SpoolError> {
        let mut out = Vec::new();
        let mut pos = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        while out.len() < max_entries {
            let (committed, sealed, next_id) = {
                let segs = self.segments.lock().unwrap_or_else(|p| p.into_inner());
                match segs.get(&pos.id) {
                    Some(s) => (
                        s.bytes,
                        s.sealed,
                        segs.range(pos.id + 1..).next().map(|(id, _)| *id),
                    ),
                    None => match segs.range(pos.id..).next() {
                        Some((id, _)) => {
                            *pos = ReadPos { id: *id, offset: 0 };
                            continue;
                        }
                        None => break,
                    },
                }
            };
            if pos.offset >= committed {
                match (sealed, next_id) {
                    (true, Some(n)) => {
                        *pos = ReadPos { id: n, offset: 0 };
                        continue;
                    }
                    _ => break,
                }
            }
            let want = (committed - pos.offset).min(4 * 1024 * 1024 + HEADER as u64) as usize;
            let mut buf = vec![0u8; want];
            let mut f = File::open(segment_path(&self.dir, pos.id))?;
            f.seek(SeekFrom::Start(pos.offset))?;
            f.read_exact(&mut buf)?;
            let (entries, used, corrupt) = parse_entries(&buf, max_entries - out.len());
            if corrupt || (entries.is_empty() && used == 0) {
                // Cannot happen for bytes this process committed; skip the rest.
                tracing::error!(
                    segment = pos.id,
                    offset = pos.offset,
                    "unreadable spool entry; skipping the rest of the segment"
                );
                let mut segs = self.segments.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = segs.get_mut(&pos.id) {
                    let lost = s.written - s.read;
                    s.written = s.read;
                    self.unacked.fetch_sub(lost, Ordering::AcqRel);
                }
                pos.offset = committed;
                continue;
            }
            pos.offset += used as u64;
            let n = entries.len() as u64;
            {
                let mut segs = self.segments.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = segs.get_mut(&pos.id) {
                    s.read += n;
                }
            }
            out.extend(entries.into_iter().map(|e| (pos.id, e)));
        }
        Ok(out)
    }

    /// Acknowledges `n` delivered entries read from segment `id`.
    pub fn ack(&self, id: SegmentId, n: u64) {
        let mut segs = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = segs.get_mut(&id) {
            s.acked += n;
            self.unacked.fetch_sub(n, Ordering::AcqRel);
        }
        Self::collect(&self.dir, &mut segs, id, &self.total_bytes);
    }

    /// Deletes a sealed segment whose entries are all delivered.
    fn collect(
        dir: &Path,
        segs: &mut BTreeMap<SegmentId, Segment>,
        id: SegmentId,
        total: &AtomicU64,
    ) {
        if let Some(s) = segs.get(&id)
            && s.sealed
            && s.acked >= s.written
            && s.read >= s.written
        {
            let bytes = s.bytes;
            segs.remove(&id);
            if let Err(e) = std::fs::remove_file(segment_path(dir, id)) {
                tracing::warn!(segment = id, error = %e, "could not delete a delivered spool segment");
            }
            total.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// When everything written has been delivered, empties the active
    /// segment so the spool is left empty. Returns true if it is empty.
    pub fn reset_if_drained(&self) -> bool {
        if self.pending() > 0 {
            return false;
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut segs = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        let drained = segs
            .values()
            .all(|s| s.acked >= s.written && s.read >= s.written);
        if !drained {
            return false;
        }
        if w.len > 0 {
            if w.file.set_len(0).is_err() {
                return false;
            }
            self.total_bytes.fetch_sub(w.len, Ordering::AcqRel);
            w.len = 0;
        }
        let active = w.id;
        segs.retain(|id, _| *id == active);
        segs.insert(active, Segment::default());
        drop(segs);
        let mut pos = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        *pos = ReadPos {
            id: active,
            offset: 0,
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: usize) -> Outgoing {
        Outgoing {
            partition_key: format!("key-{i}"),
            data: Bytes::from(vec![i as u8; 100 + i % 50]),
        }
    }

    #[test]
    fn round_trip_in_order_and_left_empty() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, rec) = Spool::open(dir.path(), 1 << 20, 4096).expect("open");
        assert_eq!(rec, Recovery::default());
        for i in 0..200 {
            spool.append_all(&[ev(i)]).expect("append");
        }
        assert_eq!(spool.pending(), 200);
        let mut got = Vec::new();
        loop {
            let batch = spool.read_batch(37).expect("read");
            if batch.is_empty() {
                break;
            }
            for (seg, e) in batch {
                spool.ack(seg, 1);
                got.push(e);
            }
        }
        assert_eq!(got.len(), 200);
        for (i, e) in got.iter().enumerate() {
            assert_eq!(e.partition_key, format!("key-{i}"));
        }
        assert!(spool.reset_if_drained());
        assert_eq!(spool.bytes(), 0);
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| {
                std::fs::metadata(e.path())
                    .map(|m| m.len() > 0)
                    .unwrap_or(false)
            })
            .filter(|e| e.file_name() != "LOCK")
            .collect();
        assert!(files.is_empty(), "left empty: {files:?}");
    }

    #[test]
    fn bounded_and_locked() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(dir.path(), 1000, 4096).expect("open");
        let mut n = 0;
        while spool.append_all(&[ev(1)]).is_ok() {
            n += 1;
        }
        assert!(n > 0 && spool.bytes() <= 1000);
        assert!(matches!(spool.append_all(&[ev(1)]), Err(SpoolError::Full)));
        assert!(
            Spool::open(dir.path(), 1000, 4096).is_err(),
            "a second opener is refused"
        );
    }

    #[test]
    fn torn_tail_is_cut_on_open_and_the_rest_survives() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let (spool, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("open");
            for i in 0..10 {
                spool.append_all(&[ev(i)]).expect("append");
            }
        }
        // Simulate a write cut short: half an entry at the tail.
        let seg = segment_path(dir.path(), 1);
        let half = &frame("torn", &[9u8; 300])[..150];
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .expect("seg")
            .write_all(half)
            .expect("write");
        let (spool, rec) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("reopen");
        assert_eq!(rec.entries, 10);
        assert_eq!(rec.truncated_bytes, 150);
        let batch = spool.read_batch(100).expect("read");
        assert_eq!(batch.len(), 10);
        // A flipped bit in the middle cuts from there.
        drop(spool);
        let mut bytes = std::fs::read(&seg).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(&seg, &bytes).expect("write");
        let (spool, rec) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("reopen");
        assert!(rec.entries < 10 && rec.truncated_bytes > 0);
        let batch = spool.read_batch(100).expect("read");
        for (i, (_, e)) in batch.iter().enumerate() {
            assert_eq!(
                e.partition_key,
                format!("key-{i}"),
                "only whole, valid entries"
            );
        }
    }
}
