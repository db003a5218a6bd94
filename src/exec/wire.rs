//! Host bytes over a communicator of device (or host) buffers, and the
//! cutting and placing of the boxes a distributed run moves.

use crate::backend::Backend;
use crate::comm::Communicator;
use crate::error::Result;
use crate::layout::boxes::BoxCopy;

/// The copy that cuts `c`'s box out of the source into a dense buffer of
/// the box's shape (destination axis order and dtype).
pub(super) fn cutting(c: &BoxCopy) -> BoxCopy {
    BoxCopy {
        dst_shape: c.extent.clone(),
        dst_offset: vec![0; c.extent.len()],
        ..c.clone()
    }
}

/// The copy that places a box cut by [`cutting`] where `c` puts it.
pub(super) fn placing(c: &BoxCopy) -> BoxCopy {
    BoxCopy {
        src_shape: c.extent.clone(),
        src_dtype: c.dst_dtype,
        src_offset: vec![0; c.extent.len()],
        src_axes: Vec::new(),
        ..c.clone()
    }
}

/// Writes `words` as little-endian u64s into `buf` from byte `at`: the
/// fixed-width records ranks exchange while they agree on a job.
pub(super) fn put_u64s(buf: &mut [u8], at: usize, words: &[u64]) {
    for (k, w) in words.iter().enumerate() {
        buf[at + 8 * k..at + 8 * k + 8].copy_from_slice(&w.to_le_bytes());
    }
}

/// The little-endian u64 at byte `at` of `buf`.
pub(super) fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Host bytes over a communicator of device (or host) buffers.
pub(super) struct Wire<'a, B: Backend, C> {
    pub(super) backend: &'a B,
    pub(super) comm: &'a C,
}

impl<B: Backend, C: Communicator<Buffer = B::Buffer>> Wire<'_, B, C> {
    pub(super) fn download(&self, buf: &B::Buffer, len: usize) -> Result<Vec<u8>> {
        let mut host = vec![0u8; len];
        if len > 0 {
            self.backend.download(buf, 0, &mut host)?;
            self.backend.synchronize()?;
        }
        Ok(host)
    }

    /// Every rank's `mine` (all the same length), in rank order.
    pub(super) fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.comm.size();
        let len = mine.len().max(1);
        let mut send = self.backend.alloc(len)?;
        let mut padded = mine.to_vec();
        padded.resize(len, 0);
        self.backend.upload(&padded, &mut send, 0)?;
        let mut all = self.backend.alloc(len * n)?;
        self.comm.all_gather(&send, &mut all, len)?;
        self.backend.synchronize()?;
        let host = self.download(&all, len * n)?;
        Ok(host.chunks(len).map(|c| c[..mine.len()].to_vec()).collect())
    }

    pub(super) fn send(&self, bytes: &[u8], to: usize) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut b = self.backend.alloc(bytes.len())?;
        self.backend.upload(bytes, &mut b, 0)?;
        self.comm.send(&b, bytes.len(), to)?;
        self.backend.synchronize()
    }

    pub(super) fn recv(&self, len: usize, from: usize) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut b = self.backend.alloc(len)?;
        self.comm.recv(&mut b, len, from)?;
        self.backend.synchronize()?;
        self.download(&b, len)
    }
}

/// `RESHARD_TEST_STALL_EXCHANGE_MS`: test-only fault injection, a pause
/// after this rank's first box, so a test can kill a rank mid-exchange.
pub(super) fn test_stall(done: &mut bool) {
    if !*done {
        *done = true;
        if let Some(pause) = super::hooks::pause("RESHARD_TEST_STALL_EXCHANGE_MS") {
            std::thread::sleep(pause);
        }
    }
}

/// Every rank's `mine` (of any length), in rank order.
pub fn all_gather_bytes<B, C>(backend: &B, comm: &C, mine: &[u8]) -> Result<Vec<Vec<u8>>>
where
    B: Backend,
    C: Communicator<Buffer = B::Buffer>,
{
    let wire = Wire { backend, comm };
    let lens = wire.all_gather(&(mine.len() as u64).to_le_bytes())?;
    let lens: Vec<usize> = lens.iter().map(|l| u64_at(l, 0) as usize).collect();
    let longest = lens.iter().copied().max().unwrap_or(0);
    let mut padded = mine.to_vec();
    padded.resize(longest, 0);
    let all = wire.all_gather(&padded)?;
    Ok(all
        .into_iter()
        .zip(lens)
        .map(|(mut b, n)| {
            b.truncate(n);
            b
        })
        .collect())
}
