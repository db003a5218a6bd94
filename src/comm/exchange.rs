//! N ranks run one [`Plan`] together, each reading only its share of the
//! sources and exchanging the slices others need through a
//! [`Communicator`] (device to device with HCCL): source file `i` is read
//! by rank `i mod N` only, destination file `f` is assembled and written by
//! rank `f mod N`. Every source byte is read once in the whole job; no rank
//! holds a full copy of anything it does not write.
//!
//! All ranks walk the plan's tensors in the same order; for each box copy
//! whose source another rank holds, that rank cuts the box (with its cast)
//! into a dense buffer and sends it, and the writer places it. A failure
//! anywhere fails every rank: a rank that dies or hangs makes its peers'
//! next exchange time out, and a final status exchange makes ranks whose
//! own part succeeded remove the files they wrote, so a failed job leaves
//! no destination file behind (each file is also written under a temporary
//! name and renamed only when complete).
//!
//! Manifests (`<file>.manifest.json`) and `--resume` are not written or
//! honoured here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Serialize;

use super::Communicator;
use crate::backend::{Backend, BoxCopy, Src};
use crate::error::{Error, Result};
use crate::formats::ckpt::{CkptWriter, ReadOptions, WriteOptions};
use crate::formats::safetensors::StreamWriter;
use crate::formats::tree::FileFormat;
use crate::formats::Source;
use crate::plan::{Content, CopyStep, Plan};

/// What one rank did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RankReport {
    /// This rank.
    pub rank: usize,
    /// Files this rank wrote.
    pub files: Vec<PathBuf>,
    /// Source files this rank opened (indices into the plan's sources).
    pub sources_read: Vec<usize>,
    /// Bytes this rank sent to / received from peers.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
}

struct Ctx<'a, B: Backend, C: Communicator<Buffer = B::Buffer>> {
    plan: &'a Plan,
    backend: &'a B,
    comm: &'a C,
    read: &'a ReadOptions,
    sources: Vec<OnceLock<std::result::Result<Source, String>>>,
    report: RankReport,
}

/// Safetensors metadata of the plan's outputs (as `exec` writes them).
fn st_metadata() -> BTreeMap<String, String> {
    [("format".to_string(), "ms".to_string())].into()
}

enum Writer {
    Ckpt(CkptWriter),
    St(StreamWriter),
}

impl<'a, B: Backend, C: Communicator<Buffer = B::Buffer>> Ctx<'a, B, C> {
    fn owner_of_source(&self, i: usize) -> usize {
        i % self.comm.size()
    }

    fn source(&self, i: usize) -> Result<&Source> {
        debug_assert_eq!(self.owner_of_source(i), self.comm.rank());
        self.sources[i]
            .get_or_init(|| {
                Source::open(&self.plan.sources[i].path, self.read).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Error::invalid(e.clone()))
    }

    fn bytes_of<'s>(
        &'s self,
        step: &CopyStep,
        joined: &'s mut Option<Vec<u8>>,
    ) -> Result<&'s [u8]> {
        let chunks = self.source(step.source)?.chunks(&step.tensor)?;
        Ok(match chunks.as_slice() {
            [one] => one,
            many => joined.insert(many.concat()),
        })
    }

    /// `bytes` bytes from rank `from` to rank `to` (host side).
    fn move_bytes(
        &mut self,
        from: usize,
        to: usize,
        data: Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
        let me = self.comm.rank();
        if from == to {
            return Ok(data);
        }
        if me == from {
            let data = data.expect("the sender has the data");
            let mut len = self.backend.alloc(8)?;
            self.backend
                .upload(&(data.len() as u64).to_le_bytes(), &mut len, 0)?;
            self.comm.send(&len, 8, to)?;
            if !data.is_empty() {
                let mut b = self.backend.alloc(data.len())?;
                self.backend.upload(&data, &mut b, 0)?;
                self.comm.send(&b, data.len(), to)?;
                self.backend.synchronize()?;
            }
            self.backend.synchronize()?;
            self.report.bytes_sent += data.len() as u64;
            Ok(None)
        } else if me == to {
            let mut len = self.backend.alloc(8)?;
            self.comm.recv(&mut len, 8, from)?;
            self.backend.synchronize()?;
            let mut n = [0u8; 8];
            self.backend.download(&len, 0, &mut n)?;
            let n = u64::from_le_bytes(n) as usize;
            let mut out = vec![0u8; n];
            if n > 0 {
                let mut b = self.backend.alloc(n)?;
                self.comm.recv(&mut b, n, from)?;
                self.backend.synchronize()?;
                self.backend.download(&b, 0, &mut out)?;
            }
            self.report.bytes_received += n as u64;
            Ok(Some(out))
        } else {
            Ok(None)
        }
    }

    /// The owner's buffer of `bytes` filled by `steps`, the remote boxes
    /// arriving from the ranks that read them (`None` on other ranks).
    fn fill(
        &mut self,
        owner: usize,
        steps: &[CopyStep],
        bytes: usize,
        temps: &mut Vec<B::Buffer>,
    ) -> Result<Option<B::Buffer>> {
        let me = self.comm.rank();
        let mut dst = if me == owner {
            Some(self.backend.alloc(bytes)?)
        } else {
            None
        };
        for step in steps {
            let p = self.owner_of_source(step.source);
            let c = &step.copy;
            let n = c.extent.len();
            let box_bytes = c.elements() as usize * c.dst_dtype.size();
            if p == owner {
                if me == owner {
                    let mut joined = None;
                    let src = self.bytes_of(step, &mut joined)?;
                    self.backend
                        .box_copy(Src::Host(src), dst.as_mut().expect("owner"), c)?;
                }
                continue;
            }
            if box_bytes == 0 {
                continue;
            }
            if me == p {
                let mut tmp = self.backend.alloc(box_bytes)?;
                let cut = BoxCopy {
                    dst_shape: c.extent.clone(),
                    dst_offset: vec![0; n],
                    ..c.clone()
                };
                let mut joined = None;
                let src = self.bytes_of(step, &mut joined)?;
                self.backend.box_copy(Src::Host(src), &mut tmp, &cut)?;
                self.comm.send(&tmp, box_bytes, owner)?;
                self.report.bytes_sent += box_bytes as u64;
                temps.push(tmp);
            } else if me == owner {
                let mut tmp = self.backend.alloc(box_bytes)?;
                self.comm.recv(&mut tmp, box_bytes, p)?;
                self.report.bytes_received += box_bytes as u64;
                let place = BoxCopy {
                    src_shape: c.extent.clone(),
                    src_dtype: c.dst_dtype,
                    src_offset: vec![0; n],
                    src_axes: Vec::new(),
                    ..c.clone()
                };
                self.backend
                    .box_copy(Src::Buffer(&tmp), dst.as_mut().expect("owner"), &place)?;
                temps.push(tmp);
            }
        }
        Ok(dst)
    }

    fn host(&self, buf: &B::Buffer, bytes: usize) -> Result<Vec<u8>> {
        self.backend.synchronize()?;
        Ok(match self.backend.host_bytes(buf) {
            Some(h) => h.to_vec(),
            None => {
                let mut h = vec![0u8; bytes];
                self.backend.download(buf, 0, &mut h)?;
                h
            }
        })
    }

    fn string(&mut self, owner: usize, source: usize, tensor: &str) -> Result<Option<String>> {
        let p = self.owner_of_source(source);
        let mine = if self.comm.rank() == p {
            Some(self.source(source)?.string(tensor)?.into_bytes())
        } else {
            None
        };
        let got = self.move_bytes(p, owner, mine)?;
        Ok(got.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    fn run(&mut self) -> Result<()> {
        let (me, n) = (self.comm.rank(), self.comm.size());
        for (fi, file) in self.plan.files.iter().enumerate() {
            let owner = fi % n;
            // Safetensors: strings go in the header, so they come first; the
            // writer's tensor order is shared with every rank.
            let mut writer = None;
            let mut order: Vec<usize> = (0..file.tensors.len()).collect();
            if me == owner {
                if let Some(dir) = file.path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| Error::from(e).in_file(dir))?;
                }
            }
            match file.format {
                FileFormat::Ckpt => {
                    if me == owner {
                        writer = Some(Writer::Ckpt(CkptWriter::create(
                            &file.path,
                            WriteOptions::default(),
                        )?));
                    }
                }
                FileFormat::Safetensors => {
                    let mut metadata = st_metadata();
                    let mut specs = Vec::new();
                    for t in &file.tensors {
                        match &t.content {
                            Content::Tensor { dtype, shape, .. }
                            | Content::Merged { dtype, shape, .. } => specs.push((
                                t.name.clone(),
                                *dtype,
                                shape.iter().map(|&d| d as usize).collect(),
                            )),
                            Content::Str { source, tensor } => {
                                if let Some(v) = self.string(owner, *source, tensor)? {
                                    metadata.insert(
                                        format!(
                                            "{}{}",
                                            crate::formats::safetensors::STRING_KEY_PREFIX,
                                            t.name
                                        ),
                                        v,
                                    );
                                }
                            }
                        }
                    }
                    let names: Option<Vec<u8>> = if me == owner {
                        let w = StreamWriter::create(&file.path, &specs, Some(metadata))?;
                        let names = w.order().collect::<Vec<_>>().join("\n").into_bytes();
                        writer = Some(Writer::St(w));
                        Some(names)
                    } else {
                        None
                    };
                    // Everyone learns the order from the owner.
                    let mut names_everywhere = None;
                    for r in 0..n {
                        let got = self.move_bytes(
                            owner,
                            r,
                            if me == owner { names.clone() } else { None },
                        )?;
                        if r == me {
                            names_everywhere = got;
                        }
                    }
                    let names =
                        String::from_utf8_lossy(&names_everywhere.expect("order")).into_owned();
                    let index: BTreeMap<&str, usize> = file
                        .tensors
                        .iter()
                        .enumerate()
                        .map(|(i, t)| (t.name.as_str(), i))
                        .collect();
                    order = names
                        .split('\n')
                        .filter(|s| !s.is_empty())
                        .map(|s| index[s])
                        .collect();
                }
            }
            for ti in order {
                let t = &file.tensors[ti];
                self.tensor(owner, t, writer.as_mut())
                    .map_err(|e| e.in_tensor(&t.name).in_file(&file.path))?;
            }
            if let Some(w) = writer {
                match w {
                    Writer::Ckpt(w) => w.finish()?,
                    Writer::St(w) => w.finish()?,
                }
                self.report.files.push(file.path.clone());
            }
        }
        Ok(())
    }

    fn tensor(
        &mut self,
        owner: usize,
        t: &crate::plan::TensorPlan,
        writer: Option<&mut Writer>,
    ) -> Result<()> {
        let mut temps = Vec::new();
        let out: Option<(Vec<u8>, crate::DType, Vec<i64>)> = match &t.content {
            Content::Str { source, tensor } => {
                let v = self.string(owner, *source, tensor)?;
                if let (Some(v), Some(Writer::Ckpt(w))) = (v, writer) {
                    w.write_string(&t.name, &v)?;
                }
                return Ok(());
            }
            Content::Tensor {
                dtype,
                shape,
                steps,
            } => {
                let bytes = t.bytes() as usize;
                let buf = self.fill(owner, steps, bytes, &mut temps)?;
                match buf {
                    Some(b) => Some((self.host(&b, bytes)?, *dtype, shape.clone())),
                    None => None,
                }
            }
            Content::Merged {
                dtype,
                shape,
                steps,
                lora,
            } => {
                let count: u64 = shape.iter().product::<i64>().max(0) as u64;
                let w = self.fill(owner, steps, count as usize * 4, &mut temps)?;
                let b = self.fill(
                    owner,
                    &lora.b_steps,
                    (lora.b_shape[0] * lora.b_shape[1]) as usize * 4,
                    &mut temps,
                )?;
                let a = self.fill(
                    owner,
                    &lora.a_steps,
                    (lora.a_shape[0] * lora.a_shape[1]) as usize * 4,
                    &mut temps,
                )?;
                match (w, b, a) {
                    (Some(mut w), Some(b), Some(a)) => {
                        for block in &lora.blocks {
                            self.backend.lora_add(&mut w, &b, &a, block)?;
                        }
                        let bytes = count as usize * dtype.size();
                        let mut out = self.backend.alloc(bytes)?;
                        self.backend.box_copy(
                            Src::Buffer(&w),
                            &mut out,
                            &BoxCopy::whole(&[count], crate::DType::F32, *dtype),
                        )?;
                        Some((self.host(&out, bytes)?, *dtype, shape.clone()))
                    }
                    _ => None,
                }
            }
        };
        // Every rank: the tensor's exchanges are done; free the temporaries.
        self.backend.synchronize()?;
        drop(temps);
        if let (Some((bytes, dtype, shape)), Some(w)) = (out, writer) {
            match w {
                Writer::Ckpt(w) => w.write_tensor_chunks(&t.name, dtype, &shape, &[&bytes])?,
                Writer::St(w) => w.write(&t.name, &[&bytes])?,
            }
        }
        Ok(())
    }
}

/// Runs this rank's part of `plan` (every rank calls it with the same plan).
pub fn execute<B, C>(plan: &Plan, backend: &B, comm: &C, read: &ReadOptions) -> Result<RankReport>
where
    B: Backend,
    C: Communicator<Buffer = B::Buffer>,
{
    let (me, n) = (comm.rank(), comm.size());
    let mut ctx = Ctx {
        plan,
        backend,
        comm,
        read,
        sources: plan.sources.iter().map(|_| OnceLock::new()).collect(),
        report: RankReport {
            rank: me,
            ..Default::default()
        },
    };
    let outcome = ctx.run();
    ctx.report.sources_read = (0..plan.sources.len())
        .filter(|i| ctx.sources[*i].get().is_some())
        .collect();
    // Everyone learns whether everyone succeeded.
    let status = (|| -> Result<Vec<u8>> {
        let mut mine = backend.alloc(1)?;
        backend.upload(&[outcome.is_ok() as u8], &mut mine, 0)?;
        let mut all = backend.alloc(n)?;
        comm.all_gather(&mine, &mut all, 1)?;
        backend.synchronize()?;
        let mut host = vec![0u8; n];
        backend.download(&all, 0, &mut host)?;
        Ok(host)
    })();
    let failed_peer = match &status {
        Ok(s) => s.iter().position(|ok| *ok == 0),
        Err(_) => None,
    };
    let error = match (outcome, status, failed_peer) {
        (Err(e), _, _) => Some(e),
        (Ok(()), Err(e), _) => Some(e),
        (Ok(()), Ok(_), Some(r)) => Some(Error::invalid(format!(
            "rank {r} of the job failed, so rank {me} removed the files it wrote"
        ))),
        (Ok(()), Ok(_), None) => None,
    };
    match error {
        None => Ok(ctx.report),
        Some(e) => {
            for f in &ctx.report.files {
                let _ = std::fs::remove_file(f);
                if let Some(dir) = f.parent() {
                    let _ = std::fs::remove_dir(dir);
                }
            }
            Err(e)
        }
    }
}
