//! `reshard rewrite` on a directory against `mindspore.ckpt_to_safetensors`
//! and `safetensors_to_ckpt` on directories (with `name_map` and
//! `file_name_regex`): every file byte-identical.

use reshard::formats::tree::FileFormat;
use reshard::ops::rewrite::{rewrite_tree, RewriteOptions, TreeRewriteOptions};

use crate::util::{mindspore_python, run_py, tempdir};

#[test]
fn tree_rewrite_is_byte_identical_to_mindspore() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let dir = tempdir();
    run_py(&python, "rewrite_gen.py", &[dir.path().to_str().unwrap()]);
    let d = dir.path().join("rw");
    let name_map =
        serde_json::from_slice(&std::fs::read(d.join("name_map.json")).unwrap()).unwrap();
    let to_st = rewrite_tree(
        &d.join("src"),
        &d.join("ours_st"),
        &TreeRewriteOptions {
            to: FileFormat::Safetensors,
            file_name_regex: Some("^src_".into()),
            file: RewriteOptions {
                name_map: Some(name_map),
                ..Default::default()
            },
        },
    )
    .unwrap();
    assert_eq!(to_st.len(), 2, "other_0.ckpt is not matched by the regex");
    let st_to_ck = TreeRewriteOptions {
        to: FileFormat::Ckpt,
        file_name_regex: None,
        file: RewriteOptions::default(),
    };
    let to_ck = rewrite_tree(&d.join("st"), &d.join("ours_ck"), &st_to_ck).unwrap();
    for (ours, theirs) in [("ours_st", "st"), ("ours_ck", "ck")] {
        for r in 0..2 {
            let ext = if theirs == "st" {
                "safetensors"
            } else {
                "ckpt"
            };
            let f = format!("rank_{r}/src_{r}.{ext}");
            assert!(
                std::fs::read(d.join(ours).join(&f)).unwrap()
                    == std::fs::read(d.join(theirs).join(&f)).unwrap(),
                "{ours}/{f} differs from MindSpore's"
            );
        }
    }
    assert_eq!(to_ck.len(), 2);
    // Existing outputs are refused, and nothing of this run is left.
    let again = rewrite_tree(&d.join("st"), &d.join("ours_ck"), &st_to_ck).unwrap_err();
    assert_eq!(again.kind(), reshard::ErrorKind::Destination, "{again}");
    assert!(again.to_string().contains("already exists"), "{again}");
}
