//! A rank's part of a distributed run: the ranks of a job run one plan
//! together through a [`Communicator`] (HCCL on Ascend), each reading only
//! source files on its own disk, and [`execute`](super::execute) writes
//! every file — there is no second executor or writer.
//!
//! Every rank holds the same plan and walks it the same way:
//!
//! 1. **Agree.** A handshake checks that all ranks run the same plan in a
//!    job of the same size; then each rank says which source files it has
//!    on its disk.
//! 2. **Assign.** Destination file `f` is written by rank `f.rank mod N`.
//!    Each source file gets exactly one reader among the ranks that have
//!    it: the one that writes most of its bytes, ties to the rank nearest
//!    `i mod N`. A needed source on no rank's disk fails every rank with
//!    [`JobErrorKind::SourceMissing`]. With `--resume`, writers say which of
//!    their files are already complete; those are left out.
//! 3. **Exchange.** With manifests, each reader hashes its sources once and
//!    the digests are shared. Then, in plan order, every copy whose source
//!    another rank reads becomes a send there (the box, cut and cast into a
//!    dense buffer) and a receive here; string entries travel likewise.
//! 4. **Write.** The writer runs [`execute`](super::execute) on its files,
//!    the received boxes standing in for the sources it does not read:
//!    manifests, `--resume`, progress and temporary names + rename as in a
//!    local run.
//! 5. **Confirm.** A final status exchange: if any rank failed, every rank
//!    removes the files it wrote, so a failed job leaves nothing behind. A
//!    rank that dies makes its peers' next exchange fail after the
//!    communicator's timeout.
//!
//! Memory: a writer holds the boxes it receives for all its files until it
//! has written them (in an `auto` job, one file: the part of its rank's
//! checkpoint that other ranks read).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;

use super::{execute_with, ExecOptions, ExecReport};
use crate::backend::{Backend, BoxCopy, Src};
use crate::comm::Communicator;
use crate::error::{Error, JobErrorKind, Result};
use crate::formats::atomic::FileDigest;
use crate::formats::manifest;
use crate::formats::Source;
use crate::plan::{Content, CopyStep, Plan};
use crate::DType;

/// What one rank of a distributed run read, sent and received.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ExchangeReport {
    /// This rank.
    pub rank: usize,
    /// Ranks in the job.
    pub world: usize,
    /// Source files this rank read (indexes into the plan's sources).
    pub sources_read: Vec<usize>,
    /// Bytes this rank read from its disk: the whole of each source it
    /// read when manifests are written (it hashes them), else the bytes of
    /// the source tensors it used.
    pub bytes_read: u64,
    /// Bytes sent to other ranks (boxes and string values).
    pub bytes_sent: u64,
    /// Bytes received from other ranks.
    pub bytes_received: u64,
    /// Bytes sent to each rank (this rank's entry is 0).
    pub sent_to: Vec<u64>,
    /// Bytes received from each rank.
    pub received_from: Vec<u64>,
    /// Destination files this rank writes (indexes into the plan's files).
    pub files: Vec<usize>,
    /// Seconds spent before writing (agreeing, hashing, exchanging).
    pub exchange_seconds: f64,
}

/// A box as its reader cut it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BoxKey {
    source: usize,
    tensor: String,
    offset: Vec<u64>,
    extent: Vec<u64>,
    axes: Vec<usize>,
    dtype: DType,
}

impl BoxKey {
    fn of(step: &CopyStep) -> BoxKey {
        let c = &step.copy;
        BoxKey {
            source: step.source,
            tensor: step.tensor.clone(),
            offset: c.src_offset.clone(),
            extent: c.extent.clone(),
            axes: c.src_axes.clone(),
            dtype: c.dst_dtype,
        }
    }
}

/// What other ranks read for this one.
#[derive(Default)]
pub(crate) struct Received {
    boxes: HashMap<BoxKey, Vec<u8>>,
    /// String values, by (source, entry).
    pub(crate) strings: HashMap<(usize, String), String>,
    /// Every source's length and hash (for the manifests).
    pub(crate) digests: HashMap<usize, FileDigest>,
    /// Sources read here.
    local: Vec<bool>,
}

impl Received {
    /// The received box of `step`, if another rank reads its source.
    pub(crate) fn get(&self, step: &CopyStep) -> Option<&[u8]> {
        if self.local.get(step.source).copied().unwrap_or(false) {
            return None;
        }
        self.boxes.get(&BoxKey::of(step)).map(Vec::as_slice)
    }
}

/// The copy that cuts `c`'s box out of the source into a dense buffer of
/// the box's shape (destination axis order and dtype).
fn cutting(c: &BoxCopy) -> BoxCopy {
    BoxCopy {
        dst_shape: c.extent.clone(),
        dst_offset: vec![0; c.extent.len()],
        ..c.clone()
    }
}

/// The copy that places a box cut by [`cutting`] where `c` puts it.
pub(crate) fn placing(c: &BoxCopy) -> BoxCopy {
    BoxCopy {
        src_shape: c.extent.clone(),
        src_dtype: c.dst_dtype,
        src_offset: vec![0; c.extent.len()],
        src_axes: Vec::new(),
        ..c.clone()
    }
}

fn box_bytes(c: &BoxCopy) -> usize {
    c.elements() as usize * c.dst_dtype.size()
}

/// Host bytes over a communicator of device (or host) buffers.
struct Wire<'a, B: Backend, C> {
    backend: &'a B,
    comm: &'a C,
}

impl<B: Backend, C: Communicator<Buffer = B::Buffer>> Wire<'_, B, C> {
    fn download(&self, buf: &B::Buffer, len: usize) -> Result<Vec<u8>> {
        let mut host = vec![0u8; len];
        if len > 0 {
            self.backend.download(buf, 0, &mut host)?;
            self.backend.synchronize()?;
        }
        Ok(host)
    }

    /// Every rank's `mine` (all the same length), in rank order.
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
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

    fn send(&self, bytes: &[u8], to: usize) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut b = self.backend.alloc(bytes.len())?;
        self.backend.upload(bytes, &mut b, 0)?;
        self.comm.send(&b, bytes.len(), to)?;
        self.backend.synchronize()
    }

    fn recv(&self, len: usize, from: usize) -> Result<Vec<u8>> {
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
fn test_stall(done: &mut bool) {
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
    let lens: Vec<usize> = lens
        .iter()
        .map(|l| u64::from_le_bytes(l[..].try_into().expect("8 bytes")) as usize)
        .collect();
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

/// A fingerprint of what decides the exchange (sources, files, tensors,
/// copies), equal on every rank that planned the same job.
fn plan_fingerprint(plan: &Plan) -> u64 {
    let mut text = String::new();
    for s in &plan.sources {
        text += &format!("s{};", s.rank);
    }
    for f in &plan.files {
        text += &format!("f{}:{}:{};", f.rank, f.tensors.len(), f.bytes());
        for t in &f.tensors {
            text += &t.name;
            for s in t.content.steps() {
                text += &format!(
                    "|{}:{}:{:?}:{:?}",
                    s.source, s.tensor, s.copy.src_offset, s.copy.extent
                );
            }
            text += ";";
        }
    }
    crate::formats::hash::hash(text.as_bytes())
}

/// Runs this rank's part of `plan` (every rank of `comm` calls it with the
/// same plan; see the module docs). With one rank it is [`super::execute`].
/// A rank has the sources whose paths are files here.
pub fn execute_on<B, C>(
    plan: &Plan,
    backend: &B,
    comm: &C,
    options: &ExecOptions,
) -> Result<(ExecReport, ExchangeReport)>
where
    B: Backend,
    C: Communicator<Buffer = B::Buffer>,
{
    let local: Vec<bool> = plan.sources.iter().map(|s| s.path.is_file()).collect();
    execute_on_local(plan, backend, comm, options, &local, None)
}

/// A check of the files a rank wrote (e.g. `--verify`: re-read them
/// against their manifests), run before the ranks confirm success to each
/// other, so its failure fails the whole job.
pub type Check<'a> = &'a dyn Fn(&Plan) -> Result<()>;

/// [`execute_on`], where `local[i]` says whether this rank has source `i`
/// on its disk (at the plan's path for it), with an optional `check` of
/// this rank's written files (given the plan of those files).
pub fn execute_on_local<B, C>(
    plan: &Plan,
    backend: &B,
    comm: &C,
    options: &ExecOptions,
    local: &[bool],
    check: Option<Check<'_>>,
) -> Result<(ExecReport, ExchangeReport)>
where
    B: Backend,
    C: Communicator<Buffer = B::Buffer>,
{
    if local.len() != plan.sources.len() {
        return Err(Error::invalid(format!(
            "{} presence flags for {} sources",
            local.len(),
            plan.sources.len()
        )));
    }
    let (me, n) = (comm.rank(), comm.size());
    let start = Instant::now();
    if n <= 1 {
        let report = super::execute(plan, backend, options)?;
        let exchange = ExchangeReport {
            rank: me,
            world: 1,
            sources_read: plan.files.iter().flat_map(|f| f.sources()).collect(),
            files: (0..plan.files.len()).collect(),
            ..Default::default()
        };
        return Ok((report, exchange));
    }
    let wire = Wire { backend, comm };
    let mut report = ExchangeReport {
        rank: me,
        world: n,
        sent_to: vec![0; n],
        received_from: vec![0; n],
        ..Default::default()
    };
    let mine: Vec<usize> = (0..plan.files.len())
        .filter(|f| plan.files[*f].rank % n == me)
        .collect();
    let outcome = prepare(plan, &wire, options, &mut report, local).and_then(|received| {
        let subplan = Plan {
            sources: plan.sources.clone(),
            files: mine.iter().map(|&f| plan.files[f].clone()).collect(),
        };
        report.exchange_seconds = start.elapsed().as_secs_f64();
        let written = execute_with(&subplan, backend, options, Some(&received))?;
        if let Some(check) = check {
            if let Err(e) = check(&subplan) {
                remove_written(&written);
                return Err(e);
            }
        }
        Ok(written)
    });
    report.files = mine;
    // Everyone learns whether everyone succeeded.
    let status = wire.all_gather(&[outcome.is_ok() as u8]);
    let (written, e) = match (outcome, status) {
        // `execute` removed what it wrote.
        (Err(e), _) => return Err(e),
        (Ok(r), Err(e)) => (r, e),
        (Ok(r), Ok(s)) => {
            let failed: Vec<usize> = (0..n).filter(|r| s[*r] == [0]).collect();
            if failed.is_empty() {
                return Ok((r, report));
            }
            let e = Error::Job {
                kind: JobErrorKind::PeerFailed,
                message: format!(
                    "rank(s) {failed:?} of the job failed, so rank {me} removed the files it wrote"
                ),
            };
            (r, e)
        }
    };
    remove_written(&written);
    Err(e)
}

/// Removes the files (and manifests) a run wrote, not those it skipped.
fn remove_written(written: &ExecReport) {
    for f in written.files.iter().filter(|f| !f.skipped) {
        let _ = std::fs::remove_file(manifest::manifest_path(&f.path));
        let _ = std::fs::remove_file(&f.path);
        if let Some(dir) = f.path.parent() {
            let _ = std::fs::remove_dir(dir); // only if empty
        }
    }
}

/// Steps 1–3 of the module docs: what this rank writes needs from others.
fn prepare<B, C>(
    plan: &Plan,
    wire: &Wire<'_, B, C>,
    options: &ExecOptions,
    report: &mut ExchangeReport,
    local: &[bool],
) -> Result<Received>
where
    B: Backend,
    C: Communicator<Buffer = B::Buffer>,
{
    let (me, n) = (wire.comm.rank(), wire.comm.size());
    let writer = |f: usize| plan.files[f].rank % n;
    // 1. Same job everywhere?
    let mut hello = (n as u64).to_le_bytes().to_vec();
    hello.extend(plan_fingerprint(plan).to_le_bytes());
    let hellos = wire.all_gather(&hello)?;
    if let Some(r) = (0..n).find(|r| hellos[*r] != hello) {
        let world = u64::from_le_bytes(hellos[r][..8].try_into().expect("8 bytes"));
        return Err(Error::Job {
            kind: JobErrorKind::Mismatch,
            message: if world != n as u64 {
                format!("rank {r} runs a job of {world} ranks, rank {me} one of {n}")
            } else {
                format!(
                    "rank {r} planned a different conversion than rank {me} (other sources, \
                     strategies or options)"
                )
            },
        });
    }
    // Which sources each rank has.
    let have: Vec<u8> = local.iter().map(|l| *l as u8).collect();
    let have = wire.all_gather(&have)?;
    // --resume: files already complete are left out.
    let skipped: Vec<bool> = if options.resume {
        let flags: Vec<u8> = (0..plan.files.len())
            .map(|f| {
                (writer(f) == me && super::resume::already_complete(plan, options, &plan.files[f]))
                    as u8
            })
            .collect();
        let all = wire.all_gather(&flags)?;
        (0..plan.files.len())
            .map(|f| all[writer(f)][f] == 1)
            .collect()
    } else {
        vec![false; plan.files.len()]
    };
    // 2. Readers: per source, bytes each rank's files need from it.
    let mut need = vec![vec![0u64; n]; plan.sources.len()];
    let mut used = vec![false; plan.sources.len()];
    let mut users: Vec<Vec<&std::path::Path>> = vec![Vec::new(); plan.sources.len()];
    for (f, file) in plan.files.iter().enumerate() {
        for t in &file.tensors {
            let (steps, string) = match &t.content {
                Content::Str { source, .. } => (Vec::new(), Some(*source)),
                c => (c.steps(), None),
            };
            for i in steps.iter().map(|s| s.source).chain(string) {
                if !skipped[f] {
                    used[i] = true;
                }
                if users[i].last() != Some(&file.path.as_path()) {
                    users[i].push(&file.path);
                }
            }
            for s in steps {
                need[s.source][writer(f)] += box_bytes(&s.copy) as u64;
            }
        }
    }
    let mut reader = vec![usize::MAX; plan.sources.len()];
    let mut missing = Vec::new();
    for i in (0..plan.sources.len()).filter(|i| used[*i]) {
        let best = (0..n)
            .filter(|r| have[*r][i] == 1)
            .max_by_key(|&r| (need[i][r], n - (r + n - i % n) % n));
        match best {
            Some(r) => reader[i] = r,
            None => missing.push(i),
        }
    }
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|&i| {
                format!(
                    "{} (source rank {}, needed by {})",
                    plan.sources[i].path.display(),
                    plan.sources[i].rank,
                    users[i]
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
            .collect();
        return Err(Error::Job {
            kind: JobErrorKind::SourceMissing,
            message: format!(
                "{} source file(s) are on no rank's disk: {}",
                missing.len(),
                list.join("; ")
            ),
        });
    }
    let local: Vec<bool> = reader.iter().map(|r| *r == me).collect();
    report.sources_read = (0..plan.sources.len()).filter(|i| local[*i]).collect();
    let mut opened: HashMap<usize, Source> = HashMap::new();
    for &i in &report.sources_read {
        opened.insert(i, Source::open(&plan.sources[i].path, &options.read)?);
    }
    let open = |i: usize| -> Result<&Source> {
        opened
            .get(&i)
            .ok_or_else(|| Error::invalid(format!("source {i} is not read by this rank")))
    };
    let mut received = Received {
        local: local.clone(),
        ..Default::default()
    };
    // 3. Digests, from each source's reader.
    if options.manifest.is_some() {
        let mut mine_d = vec![0u8; 16 * plan.sources.len()];
        for &i in &report.sources_read {
            let d = manifest::digest_file(&plan.sources[i].path)?;
            report.bytes_read += d.bytes;
            mine_d[16 * i..16 * i + 8].copy_from_slice(&d.bytes.to_le_bytes());
            mine_d[16 * i + 8..16 * i + 16].copy_from_slice(&d.xxh3.to_le_bytes());
        }
        let all = wire.all_gather(&mine_d)?;
        for i in (0..plan.sources.len()).filter(|i| used[*i]) {
            let d = &all[reader[i]][16 * i..16 * i + 16];
            received.digests.insert(
                i,
                FileDigest {
                    bytes: u64::from_le_bytes(d[..8].try_into().expect("8 bytes")),
                    xxh3: u64::from_le_bytes(d[8..].try_into().expect("8 bytes")),
                },
            );
        }
    }
    // Boxes and strings, in plan order.
    let mut moved: HashSet<(usize, BoxKey)> = HashSet::new();
    let mut stalled = false;
    let mut touched: HashSet<(usize, String)> = HashSet::new();
    let mut joined: HashMap<(usize, String), Vec<u8>> = HashMap::new();
    for (f, file) in plan.files.iter().enumerate() {
        if skipped[f] {
            continue;
        }
        let w = writer(f);
        for t in &file.tensors {
            let context = |e: Error| e.in_tensor(&t.name).in_file(&file.path);
            if let Content::Str { source, tensor } = &t.content {
                let p = reader[*source];
                if p == me && w != me {
                    let v = open(*source)
                        .and_then(|s| s.string(tensor))
                        .map_err(context)?;
                    wire.send(&(v.len() as u64).to_le_bytes(), w)?;
                    wire.send(v.as_bytes(), w)?;
                    report.bytes_sent += v.len() as u64;
                    report.sent_to[w] += v.len() as u64;
                } else if w == me && p != me {
                    let len = wire.recv(8, p)?;
                    let len = u64::from_le_bytes(len[..].try_into().expect("8 bytes")) as usize;
                    let v = wire.recv(len, p)?;
                    report.bytes_received += len as u64;
                    report.received_from[p] += len as u64;
                    received.strings.insert(
                        (*source, tensor.clone()),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
                continue;
            }
            for step in t.content.steps() {
                let p = reader[step.source];
                if p == me {
                    touched.insert((step.source, step.tensor.clone()));
                }
                let bytes = box_bytes(&step.copy);
                if p == w || bytes == 0 || !moved.insert((w, BoxKey::of(step))) {
                    continue;
                }
                if p == me {
                    let mut buf = wire.backend.alloc(bytes)?;
                    let chunks = open(step.source)
                        .and_then(|s| s.chunks(&step.tensor))
                        .map_err(context)?;
                    let src: &[u8] = match chunks.as_slice() {
                        [one] => one,
                        many => joined
                            .entry((step.source, step.tensor.clone()))
                            .or_insert_with(|| many.concat()),
                    };
                    wire.backend
                        .box_copy(Src::Host(src), &mut buf, &cutting(&step.copy))
                        .map_err(context)?;
                    wire.comm.send(&buf, bytes, w)?;
                    wire.backend.synchronize()?;
                    report.bytes_sent += bytes as u64;
                    report.sent_to[w] += bytes as u64;
                    test_stall(&mut stalled);
                } else if w == me {
                    let b = wire.recv(bytes, p).map_err(context)?;
                    report.bytes_received += bytes as u64;
                    report.received_from[p] += bytes as u64;
                    test_stall(&mut stalled);
                    received.boxes.insert(BoxKey::of(step), b);
                }
            }
        }
        // A source tensor stored in several records is joined once per file.
        joined.clear();
    }
    if options.manifest.is_none() {
        for (i, tensor) in &touched {
            if let Ok(chunks) = open(*i).and_then(|s| s.chunks(tensor)) {
                report.bytes_read += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
            }
        }
    }
    Ok(received)
}

/// `plan` run as a job of `ranks` ranks, threads of this process over an
/// [`InProcess`](crate::comm::InProcess) communicator on the CPU backend
/// (benchmarks, tests): the ranks' reports merged, and each rank's
/// exchange report.
pub fn in_process_job(
    plan: &Plan,
    ranks: usize,
    options: &ExecOptions,
) -> Result<(ExecReport, Vec<ExchangeReport>)> {
    let comms = crate::comm::InProcess::group(ranks.max(1), std::time::Duration::from_secs(600));
    let start = Instant::now();
    let results: Vec<Result<(ExecReport, ExchangeReport)>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .map(|c| {
                s.spawn(move || execute_on(plan, &crate::backend::CpuBackend::new(1), c, options))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::invalid("a rank's thread panicked")))
            })
            .collect()
    });
    let mut files = Vec::new();
    let mut reports = Vec::new();
    for r in results {
        let (e, x) = r?;
        files.extend(e.files);
        reports.push(x);
    }
    files.sort_by_key(|f| f.rank);
    Ok((
        ExecReport {
            bytes_written: files.iter().map(|f| f.bytes).sum(),
            files,
            seconds: start.elapsed().as_secs_f64(),
        },
        reports,
    ))
}
