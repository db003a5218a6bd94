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
//!    the digests are shared. Then, file by file in plan order (each file's
//!    string values first, then its boxes in the order the writer places
//!    its tensors), every copy whose source another rank reads becomes a
//!    send there (the box, cut and cast into a dense buffer) and a receive
//!    here. Every rank walks this one order, so each send meets its
//!    receive.
//! 4. **Write**, at the same time as 3: the writer runs
//!    [`execute`](super::execute) on its files, taking the received boxes
//!    from the inbox ([`Received`]) in place of the sources it does not
//!    read: manifests, `--resume`, progress and temporary names + rename as
//!    in a local run.
//! 5. **Confirm.** A final status exchange: if any rank failed, every rank
//!    removes the files it wrote, so a failed job leaves nothing behind. A
//!    rank that dies makes its peers' next exchange fail after the
//!    communicator's timeout.
//!
//! Memory: the exchange runs on its own thread while the writer's workers
//! place what has arrived, and waits once [`RECEIVE_AHEAD`] bytes of boxes
//! are held that the writer has not taken. No rank waits on itself: the
//! writer hands out one file's tensors at a time, in the order their boxes
//! arrive, so every held box has a worker on its tensor (or gets one when
//! a worker finishes an earlier tensor, whose boxes arrived before it);
//! the exchange does not hold an unfinished HCCL operation while it waits
//! for room; and every peer walks the same order, so the first of the
//! ranks' pending operations always meets its match.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;

pub(crate) use super::received::Received;
use super::received::{box_bytes, BoxKey, RemoteDigest, RECEIVE_AHEAD};
pub use super::wire::all_gather_bytes;
use super::wire::{cutting, put_u64s, test_stall, u64_at, Wire};
use super::{execute_with, ExecOptions, ExecReport};
use crate::backend::{Backend, Src};
use crate::comm::Communicator;
use crate::error::{Error, JobErrorKind, Result};
use crate::formats::manifest;
use crate::formats::manifest::SourceContent;
use crate::formats::Source;
use crate::plan::{Content, Plan};

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
    /// read with `--hash-sources` (it hashes them for the manifests), else
    /// the bytes of the source tensors it used.
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
    /// Seconds until the exchange ended (agreeing, hashing, exchanging;
    /// the writer writes meanwhile).
    pub exchange_seconds: f64,
    /// The most bytes of received boxes this rank held at once, waiting for
    /// its writer (bounded by a 64 MiB inbox, or one box when larger).
    pub inbox_peak_bytes: u64,
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
    run_rank(plan, backend, comm, options, local, check, RECEIVE_AHEAD)
}

/// [`execute_on_local`], holding at most `ahead` bytes of received boxes
/// that the writer has not taken yet (beyond one box).
pub(super) fn run_rank<B, C>(
    plan: &Plan,
    backend: &B,
    comm: &C,
    options: &ExecOptions,
    local: &[bool],
    check: Option<Check<'_>>,
    ahead: usize,
) -> Result<(ExecReport, ExchangeReport)>
where
    B: Backend,
    C: Communicator<Buffer = B::Buffer>,
{
    if local.len() != plan.sources.len() {
        return Err(Error::usage(format!(
            "{} presence flags for the plan's {} sources",
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
    let outcome = agree(plan, &wire, options, &mut report, local, ahead).and_then(|agreed| {
        let subplan = Plan {
            sources: plan.sources.clone(),
            files: mine.iter().map(|&f| plan.files[f].clone()).collect(),
        };
        // Steps 3 and 4 at once: this thread sends and receives while the
        // writer places what has arrived.
        let (exchanged, written) = std::thread::scope(|s| {
            let received = &agreed.received;
            let writer = s.spawn(|| {
                let written = execute_with(&subplan, backend, options, Some(received));
                received.close();
                written
            });
            let exchanged = exchange(plan, &wire, &agreed, &mut report);
            received.end(&exchanged);
            report.exchange_seconds = start.elapsed().as_secs_f64();
            report.inbox_peak_bytes = received.peak_held() as u64;
            let written = writer.join().unwrap_or_else(|panic| {
                Err(Error::Internal(format!(
                    "the writer thread panicked: {}",
                    crate::error::panic_message(panic.as_ref())
                )))
            });
            (exchanged, written)
        });
        let written = match (exchanged, written) {
            (Ok(()), written) => written?,
            // The exchange's failure is the cause (`execute` removed what it
            // wrote if it failed too).
            (Err(e), Ok(written)) => {
                remove_written(&written);
                return Err(e);
            }
            (Err(e), Err(_)) => return Err(e),
        };
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

/// What the ranks agreed on before moving boxes (steps 1–2, and the
/// digests for the manifests).
struct Agreed {
    /// Files already complete (`--resume`), left out everywhere.
    skipped: Vec<bool>,
    /// The rank that reads each used source.
    reader: Vec<usize>,
    /// The sources this rank reads, opened.
    opened: HashMap<usize, Source>,
    /// What other ranks read for this one, as it arrives.
    received: Received,
    /// Sources were read whole (hashed for the manifests).
    hashed: bool,
}

/// Steps 1–2 of the module docs, and the digests for the manifests.
fn agree<B, C>(
    plan: &Plan,
    wire: &Wire<'_, B, C>,
    options: &ExecOptions,
    report: &mut ExchangeReport,
    local: &[bool],
    ahead: usize,
) -> Result<Agreed>
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
        let world = u64_at(&hellos[r], 0);
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
    // Which sources each rank has, with their length and modification
    // time as it sees them: on --resume, a writer checks its files' sources
    // on other nodes against these.
    const HAVE: usize = 17;
    let mut mine_h = vec![0u8; HAVE * plan.sources.len()];
    for i in (0..plan.sources.len()).filter(|i| local[*i]) {
        mine_h[HAVE * i] = 1;
        if let Some((len, ns)) = super::resume::local_stamp(plan, i) {
            put_u64s(&mut mine_h, HAVE * i + 1, &[len, ns]);
        }
    }
    let have = wire.all_gather(&mine_h)?;
    let has = |r: usize, i: usize| have[r][HAVE * i] == 1;
    let stamp = |i: usize| {
        let r = (0..n).find(|&r| has(r, i))?;
        Some((
            u64_at(&have[r], HAVE * i + 1),
            u64_at(&have[r], HAVE * i + 9),
        ))
    };
    // --resume: files already complete are left out.
    let skipped: Vec<bool> = if options.resume {
        let flags: Vec<u8> = (0..plan.files.len())
            .map(|f| {
                (writer(f) == me
                    && super::resume::already_complete_with(plan, options, &plan.files[f], &stamp))
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
            .filter(|r| has(*r, i))
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
    // Digests, from each source's reader, with its modification time (which
    // only its reader can see).
    let mut digests = HashMap::new();
    if options.manifest.is_some() {
        const EACH: usize = 32;
        let hash = options.control.hash_sources;
        let mut mine_d = vec![0u8; EACH * plan.sources.len()];
        for &i in &report.sources_read {
            let d = manifest::source_content(&plan.sources[i].path, hash)?;
            if hash {
                report.bytes_read += d.bytes;
            }
            put_u64s(
                &mut mine_d,
                EACH * i,
                &[
                    d.bytes,
                    d.xxh3.is_some() as u64,
                    d.xxh3.unwrap_or(0),
                    opened[&i].stamp_modified_ns(),
                ],
            );
        }
        let all = wire.all_gather(&mine_d)?;
        for i in (0..plan.sources.len()).filter(|i| used[*i]) {
            let d = &all[reader[i]][EACH * i..EACH * (i + 1)];
            let word = |k: usize| u64_at(d, 8 * k);
            digests.insert(
                i,
                RemoteDigest {
                    digest: SourceContent {
                        bytes: word(0),
                        xxh3: (word(1) == 1).then(|| word(2)),
                    },
                    modified_ns: word(3),
                },
            );
        }
    }
    let complete = (0..plan.files.len())
        .filter(|&f| skipped[f] && writer(f) == me)
        .map(|f| plan.files[f].path.clone())
        .collect();
    Ok(Agreed {
        skipped,
        reader,
        opened,
        received: Received::new(local, digests, complete, ahead),
        hashed: options.manifest.is_some() && options.control.hash_sources,
    })
}

/// Step 3 of the module docs: file by file in plan order, each file's
/// string values first, then its boxes in the order the writer places its
/// tensors; every copy whose source another rank reads becomes a send there
/// and a receive here.
fn exchange<B, C>(
    plan: &Plan,
    wire: &Wire<'_, B, C>,
    agreed: &Agreed,
    report: &mut ExchangeReport,
) -> Result<()>
where
    B: Backend,
    C: Communicator<Buffer = B::Buffer>,
{
    let (me, n) = (wire.comm.rank(), wire.comm.size());
    let received = &agreed.received;
    let open = |i: usize| -> Result<&Source> {
        agreed
            .opened
            .get(&i)
            .ok_or_else(|| Error::Internal(format!("source {i} is not read by rank {me}")))
    };
    let mut stalled = false;
    let mut touched: HashSet<(usize, String)> = HashSet::new();
    // The last source tensor stored in several records, joined.
    let mut joined: Option<((usize, String), Vec<u8>)> = None;
    for (f, file) in plan.files.iter().enumerate() {
        if agreed.skipped[f] {
            continue;
        }
        let w = file.rank % n;
        // String values first: the writer needs them to lay the file out.
        for t in &file.tensors {
            let Content::Str { source, tensor } = &t.content else {
                continue;
            };
            let context = |e: Error| e.in_tensor(&t.name).in_file(&file.path);
            let p = agreed.reader[*source];
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
                let len = u64_at(&len, 0) as usize;
                let v = wire.recv(len, p)?;
                report.bytes_received += len as u64;
                report.received_from[p] += len as u64;
                received.put_string(*source, tensor, String::from_utf8_lossy(&v).into_owned());
            }
        }
        for pos in super::output::placement_order(file)? {
            let t = &file.tensors[pos];
            let context = |e: Error| e.in_tensor(&t.name).in_file(&file.path);
            for step in t.content.steps() {
                let p = agreed.reader[step.source];
                if p == me {
                    touched.insert((step.source, step.tensor.clone()));
                }
                let bytes = box_bytes(&step.copy);
                if p == w || bytes == 0 {
                    continue;
                }
                if p == me {
                    let mut buf = wire.backend.alloc(bytes)?;
                    let chunks = open(step.source)
                        .and_then(|s| s.chunks(&step.tensor))
                        .map_err(context)?;
                    let src: &[u8] = match chunks.as_slice() {
                        [one] => one,
                        many => {
                            let key = (step.source, step.tensor.clone());
                            if joined.as_ref().map(|j| &j.0) != Some(&key) {
                                joined = Some((key, many.concat()));
                            }
                            &joined.as_ref().expect("joined above").1
                        }
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
                    // Room first: no HCCL operation is left pending while
                    // this thread waits for the writer.
                    let keep = received.room(bytes);
                    let b = wire.recv(bytes, p).map_err(context)?;
                    report.bytes_received += bytes as u64;
                    report.received_from[p] += bytes as u64;
                    test_stall(&mut stalled);
                    if keep {
                        received.put(BoxKey::of(step), b);
                    }
                }
            }
        }
    }
    drop(joined);
    // What this rank read for others must not have changed meanwhile (the
    // writers check the sources they read themselves).
    for source in agreed.opened.values() {
        source.unchanged()?;
    }
    if !agreed.hashed {
        for (i, tensor) in &touched {
            if let Ok(chunks) = open(*i).and_then(|s| s.chunks(tensor)) {
                report.bytes_read += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
            }
        }
    }
    Ok(())
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
                    .unwrap_or_else(|_| Err(Error::Internal("a rank's thread panicked".into())))
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::backend::CpuBackend;
    use crate::comm::InProcess;
    use crate::formats::safetensors::{write, StWriteOptions, TensorRef};
    use crate::formats::tree::FileFormat;
    use crate::layout::boxes::BoxCopy;
    use crate::plan::{CopyStep, FilePlan, SourceFile, TensorPlan};
    use crate::DType;

    /// Two sources (one per rank), two files (one per rank) whose tensors
    /// are each cut from both sources; plan order is not placement order.
    fn plan(dir: &Path, out: &Path) -> Plan {
        let sources: Vec<SourceFile> = (0..2u8)
            .map(|r| {
                let path = dir.join(format!("src{r}.safetensors"));
                let data: Vec<Vec<u8>> = (0..2u8)
                    .map(|t| (0..64u8).map(|b| b ^ (r * 16 + t * 64)).collect())
                    .collect();
                let tensors: Vec<(String, TensorRef<'_>)> = ["p", "q"]
                    .iter()
                    .zip(&data)
                    .map(|(n, d)| {
                        let r = TensorRef {
                            dtype: DType::F32,
                            shape: vec![4, 4],
                            data: d,
                        };
                        (n.to_string(), r)
                    })
                    .collect();
                write(&path, &tensors, &StWriteOptions::default()).unwrap();
                SourceFile {
                    rank: r as usize,
                    path,
                }
            })
            .collect();
        let whole = BoxCopy::whole(&[4, 4], DType::F32, DType::F32);
        // Rows 2s..2s+2 of `tensor` of source s into the same rows.
        let half = |s: usize, tensor: &str, axes: Vec<usize>| CopyStep {
            source: s,
            tensor: tensor.into(),
            copy: BoxCopy {
                src_offset: vec![2 * s as u64, 0],
                dst_offset: vec![2 * s as u64, 0],
                extent: vec![2, 4],
                src_axes: axes,
                ..whole.clone()
            },
        };
        let tensor = |name: &str, steps: Vec<CopyStep>| TensorPlan {
            name: name.into(),
            content: Content::Tensor {
                dtype: DType::F32,
                shape: vec![4, 4],
                steps,
            },
        };
        let files = (0..2)
            .map(|r| FilePlan {
                rank: r,
                path: out.join(format!("rank_{r}/out.safetensors")),
                format: FileFormat::Safetensors,
                tensors: vec![
                    tensor("z", vec![half(0, "q", vec![]), half(1, "q", vec![])]),
                    // A plain copy of the other rank's whole tensor.
                    tensor(
                        "m",
                        vec![CopyStep {
                            source: 1 - r,
                            tensor: "p".into(),
                            copy: whole.clone(),
                        }],
                    ),
                    tensor("a", vec![half(0, "p", vec![1, 0]), half(1, "q", vec![])]),
                ],
                metadata: None,
            })
            .collect();
        Plan { sources, files }
    }

    #[test]
    fn exchange_streams_boxes_in_placement_order_under_a_tiny_bound() {
        let dir = tempfile::tempdir().unwrap();
        let local = plan(dir.path(), &dir.path().join("local"));
        let options = ExecOptions {
            workers: 1,
            ..ExecOptions::default()
        };
        super::super::execute(&local, &CpuBackend::new(1), &options).unwrap();
        for workers in [1, 3] {
            let out = dir.path().join(format!("job{workers}"));
            let job = plan(dir.path(), &out);
            let options = ExecOptions {
                workers,
                ..ExecOptions::default()
            };
            let comms = InProcess::group(2, std::time::Duration::from_secs(30));
            let reports: Vec<ExchangeReport> = std::thread::scope(|s| {
                let ranks: Vec<_> = comms
                    .iter()
                    .map(|c| {
                        let (job, options) = (&job, &options);
                        s.spawn(move || {
                            let have = [c.rank() == 0, c.rank() == 1];
                            // One box held at a time: a box sent out of the
                            // writer's order would never be taken.
                            let cpu = CpuBackend::new(1);
                            run_rank(job, &cpu, c, options, &have, None, 1).unwrap().1
                        })
                    })
                    .collect();
                ranks.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (r, x) in reports.iter().enumerate() {
                assert_eq!(x.sources_read, [r]);
                assert!(x.bytes_received > 0 && x.bytes_sent == x.bytes_received);
                let name = format!("rank_{r}/out.safetensors");
                assert_eq!(
                    std::fs::read(out.join(&name)).unwrap(),
                    std::fs::read(dir.path().join("local").join(&name)).unwrap(),
                    "{name}, {workers} workers"
                );
            }
        }
    }
}
