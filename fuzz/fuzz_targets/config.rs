//! Configuration parsing and validation: any text gives a Config or a list
//! of problems that each name a field, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use wsrouter::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Err(e) = Config::from_toml(text, &base, Path::new("fuzz.toml")) {
        for problem in e.problems() {
            assert!(!problem.field.is_empty());
            assert!(!problem.problem.is_empty());
        }
    }
});
