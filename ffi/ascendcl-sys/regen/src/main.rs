//! `ascendcl-regen OUT.rs PROVENANCE INCLUDE_DIR...`: writes the committed
//! bindings of one CANN version (see `gen.rs` and `../regen.sh`).

mod gen;

use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: ascendcl-regen OUT.rs PROVENANCE INCLUDE_DIR...");
        std::process::exit(2);
    }
    let includes: Vec<&Path> = args[2..].iter().map(Path::new).collect();
    match gen::generate(&includes, &args[1]) {
        Ok(text) => {
            if let Err(e) = std::fs::write(&args[0], text) {
                eprintln!("cannot write {}: {e}", args[0]);
                std::process::exit(1);
            }
            eprintln!("wrote {}", args[0]);
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
