//! Planning shared by both directions of a conversion: the table
//! variant, `config.json`, the concat switch, each output's dtype and its
//! copies.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::config::MfLayout;
use super::engine::{InTensor, Mapped};
use super::spec::{Concat, Family, Table, Variant};
use super::{hf, ConvertOptions, ConvertReport, Dropped, ModelConfig};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::{Content, CopyStep, Plan, TensorPlan};

/// A conversion ready to run.
pub(super) struct Prepared {
    pub(super) plan: Plan,
    pub(super) report: ConvertReport,
    /// Reverse: what to write after the shards.
    pub(super) hf_out: Option<HfOut>,
}

pub(super) struct HfOut {
    pub(super) dir: PathBuf,
    pub(super) weight_map: BTreeMap<String, String>,
    pub(super) total: u64,
    pub(super) shards: usize,
    pub(super) config: serde_json::Map<String, serde_json::Value>,
    pub(super) dtype: Option<DType>,
}

pub(super) fn pick_variant<'a>(
    family: &'a Family,
    options: &ConvertOptions,
    cfg: &ModelConfig,
    names: &[&str],
) -> Result<&'a Variant> {
    if let Some(m) = &options.modal {
        return family
            .variants
            .iter()
            .find(|v| v.name == m.as_str())
            .ok_or_else(|| {
                let names: Vec<&str> = family.variants.iter().map(|v| v.name).collect();
                Error::usage_of(
                    "modal",
                    format!(
                        "{m:?} is not a variant of model {}; use one of {}",
                        family.name,
                        names.join(", ")
                    ),
                )
            });
    }
    if let Some(mt) = cfg.model_type() {
        if let Some(v) = family.variants.iter().find(|v| v.model_types.contains(&mt)) {
            return Ok(v);
        }
    }
    for v in family.variants {
        let marker = if options.reversed {
            v.ms_marker
        } else {
            v.hf_marker
        };
        if let Some(m) = marker {
            if names.iter().any(|n| n.contains(m)) {
                return Ok(v);
            }
        }
    }
    Ok(&family.variants[0])
}

pub(super) fn load_config(
    options: &ConvertOptions,
    beside: Option<PathBuf>,
) -> Result<ModelConfig> {
    // mindformers 2.x's glm-n converter takes the model's YAML as its
    // config: its layout switches are read, config.json stays the one
    // beside the input.
    let yaml = options.config.as_deref().filter(|p| MfLayout::is_yaml(p));
    let path = match &options.config {
        _ if yaml.is_some() => beside,
        Some(p) if p.is_dir() => Some(p.join("config.json")),
        Some(p) => Some(p.clone()),
        None => beside,
    };
    let mut cfg = match path {
        Some(p) => ModelConfig::read(&p)?,
        None => ModelConfig::default(),
    };
    if let Some(y) = yaml {
        cfg.mf_layout = Some(MfLayout::read(y)?);
    }
    cfg.n_head = options.n_head;
    cfg.hidden_size = options.hidden_size;
    cfg.layers = options.layers;
    cfg.vit_heads = options.vit_heads;
    Ok(cfg)
}

pub(super) fn concat_of(
    table: &Table,
    family: &Family,
    options: &ConvertOptions,
    cfg: &ModelConfig,
) -> Result<bool> {
    let from_yaml = match (cfg.mf_layout, family.name) {
        (None, _) => None,
        (Some(y), "glm-n") => Some(yaml_concat(y)?),
        (Some(_), _) => {
            return Err(Error::usage_of(
                "config",
                format!(
                    "is a mindformers model YAML, which only glm-n's converter reads; model {} \
                     takes config.json (or its directory)",
                    family.name
                ),
            ))
        }
    };
    match (table.concat, options.qkv_concat.or(from_yaml)) {
        (Concat::Default(d), q) => Ok(q.unwrap_or(d)),
        (Concat::None, Some(true)) => Err(Error::usage_of(
            "qkv_concat",
            format!(
                "is not a switch of model {}: its layout is fixed",
                family.name
            ),
        )),
        (Concat::None, _) => Ok(false),
    }
}

/// The concat switch a glm-n model YAML asks for: mindformers splits q/k/v
/// unless `qkv_concat` and the ffn unless `mlp_concat`; reshard's one switch
/// does both, and does not rearrange the rotary halves.
fn yaml_concat(y: MfLayout) -> Result<bool> {
    if y.use_rearrange_rope {
        return Err(Error::unsupported(
            "the model YAML sets use_rearrange_rope: True (q/k rows regrouped for the rotary \
             embedding); reshard writes ChatGLM's own row order only",
        ));
    }
    if y.qkv_concat != y.mlp_concat {
        return Err(Error::unsupported(format!(
            "the model YAML sets qkv_concat: {} but mlp_concat: {}; reshard fuses or splits both \
             together",
            y.qkv_concat, y.mlp_concat
        )));
    }
    Ok(y.qkv_concat)
}

pub(super) fn is_float(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

/// Picks each output's dtype and fills the copies' dtypes.
pub(super) fn tensor_plans(
    mapped: &Mapped,
    inputs: &[InTensor],
    table: &Table,
    options: &ConvertOptions,
    cfg: &ModelConfig,
) -> Result<Vec<TensorPlan>> {
    let model_dtype = cfg.torch_dtype().and_then(hf::dtype_of_torch_name);
    let mut out = Vec::with_capacity(mapped.tensors.len());
    for t in &mapped.tensors {
        let mut srcs: Vec<DType> = t.links.iter().map(|(i, _)| inputs[*i].dtype).collect();
        srcs.dedup();
        let src = *srcs.first().unwrap_or(&DType::F32);
        let natural_f32 = table.hf_f32.iter().any(|p| t.name.contains(p));
        let target = if options.reversed {
            options.dtype.or(match (t.forced, natural_f32) {
                (true, true) => Some(DType::F32),
                (true, false) => model_dtype,
                (false, _) => None,
            })
        } else if t.keep_f32 {
            Some(DType::F32)
        } else {
            options.dtype.or(table.default_dtype)
        };
        let dtype = match target {
            Some(d) if srcs.iter().all(|&s| is_float(s)) => d,
            _ => {
                if srcs.iter().any(|&s| s != src) {
                    return Err(Error::usage_of(
                        "dtype",
                        format!(
                            "needed: the parts of {:?} have different dtypes {srcs:?}",
                            t.name
                        ),
                    ));
                }
                src
            }
        };
        let steps = t
            .links
            .iter()
            .map(|(i, c)| {
                let mut copy = c.clone();
                copy.src_dtype = inputs[*i].dtype;
                copy.dst_dtype = dtype;
                CopyStep {
                    source: inputs[*i].shard,
                    tensor: inputs[*i].name.clone(),
                    copy,
                }
            })
            .collect();
        out.push(TensorPlan {
            name: t.name.clone(),
            content: Content::Tensor {
                dtype,
                shape: t.shape.iter().map(|&d| d as i64).collect(),
                steps,
            },
        });
    }
    Ok(out)
}

/// The executor copies a single whole-tensor step of equal shapes and
/// dtypes verbatim without looking at its axis permutation; give permuted
/// copies distinct views so they always take the copy path.
pub(super) fn guard_permuted(plan: &mut Plan) {
    for f in &mut plan.files {
        for t in &mut f.tensors {
            if let Content::Tensor { steps, .. } = &mut t.content {
                for s in steps {
                    let c = &mut s.copy;
                    if !c.axes_in_order()
                        && c.src_shape == c.dst_shape
                        && c.extent == c.src_shape
                        && c.src_dtype == c.dst_dtype
                    {
                        let n = c.src_shape.len();
                        c.src_shape.push(1);
                        c.src_offset.push(0);
                        c.dst_shape.insert(0, 1);
                        c.dst_offset.insert(0, 0);
                        c.extent.insert(0, 1);
                        let mut axes = vec![n];
                        axes.extend(c.src_axes.iter().copied());
                        c.src_axes = axes;
                    }
                }
            }
        }
    }
}

pub(super) fn dropped_list(mapped: &Mapped) -> Vec<Dropped> {
    mapped
        .dropped
        .iter()
        .map(|(n, r)| Dropped {
            name: n.clone(),
            reason: (*r).to_string(),
        })
        .collect()
}
