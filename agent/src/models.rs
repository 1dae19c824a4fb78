//! Model folders on this host: where a deployment's model is (`node.models_dir` for relative
//! names), and a cheap fingerprint of a checkpoint that tells two copies apart without reading
//! every weight.
//!
//! The checkpoint fingerprint (`pdagent-checkpoint-v1`, FNV-1a 64 in hex) covers, for every
//! regular file directly in the folder in name order (hidden files skipped): its name and size;
//! the whole content of the small files (`*.json`, `*.txt`, `*.model`, at most 64 MiB each);
//! and the header of each `*.safetensors` file (its length prefix and JSON header: every
//! tensor's name, dtype, shape and offsets). Two copies with the same files, sizes, configs,
//! tokenizers and tensor layouts match; weights that differ byte for byte at the same layout do
//! not change it (the engine's own model fingerprint, checked when engines exchange KV, does).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::wire::models::ModelCheck;

/// Small files hashed whole.
const SMALL_FILE_BYTES_MAX: u64 = 64 << 20;
/// Largest safetensors header read.
const SAFETENSORS_HEADER_BYTES_MAX: u64 = 100 << 20;

/// Whether `model` names a built-in preset (present on every host).
pub fn is_preset(model: &str) -> bool {
    matches!(
        pd_engine::ModelSpec::parse(model),
        pd_engine::ModelSpec::Preset(_)
    )
}

/// The folder a deployment's model names on this host: a preset stays as it is, an absolute
/// path too, a relative one is under `models_dir`.
pub fn resolve(models_dir: &Path, model: &str) -> String {
    if is_preset(model) || Path::new(model).is_absolute() {
        model.to_string()
    } else {
        models_dir.join(model).display().to_string()
    }
}

/// Looks for the model folder and fingerprints it (reads files: run off the async threads).
pub fn check(models_dir: &Path, model: &str) -> ModelCheck {
    let path = PathBuf::from(resolve(models_dir, model));
    let (fingerprint, why) = match fingerprint(&path) {
        Ok(f) => (Some(f), None),
        Err(e) => (None, Some(e)),
    };
    ModelCheck {
        path: path.display().to_string(),
        fingerprint,
        why,
    }
}

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    pd_engine::hash::fnv1a64_update(h, bytes)
}

/// The checkpoint fingerprint of the folder `dir` (see the module's documentation).
pub fn fingerprint(dir: &Path) -> Result<String, String> {
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    if !dir.join("config.json").is_file() {
        return Err(format!("no {}", dir.join("config.json").display()));
    }
    let mut files: Vec<(String, PathBuf, u64)> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| err(dir, e))? {
        let e = e.map_err(|e| err(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let meta = std::fs::metadata(e.path()).map_err(|x| err(&e.path(), x))?;
        if name.starts_with('.') || !meta.is_file() {
            continue;
        }
        files.push((name, e.path(), meta.len()));
    }
    files.sort();
    let mut h = pd_engine::hash::fnv1a64(b"pdagent-checkpoint-v1");
    for (name, path, size) in &files {
        h = fnv(h, name.as_bytes());
        h = fnv(h, &size.to_le_bytes());
        let small = [".json", ".txt", ".model"]
            .iter()
            .any(|x| name.ends_with(x));
        if small && *size <= SMALL_FILE_BYTES_MAX {
            h = fnv(h, &std::fs::read(path).map_err(|e| err(path, e))?);
        } else if name.ends_with(".safetensors") {
            let mut f = std::fs::File::open(path).map_err(|e| err(path, e))?;
            let mut len = [0u8; 8];
            f.read_exact(&mut len).map_err(|e| err(path, e))?;
            let n = u64::from_le_bytes(len);
            if n > SAFETENSORS_HEADER_BYTES_MAX || n + 8 > *size {
                return Err(format!(
                    "{}: not a safetensors file (header of {n} bytes)",
                    path.display()
                ));
            }
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header).map_err(|e| err(path, e))?;
            h = fnv(h, &len);
            h = fnv(h, &header);
        }
    }
    Ok(format!("{h:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_under_the_models_dir() {
        let d = Path::new("/var/lib/pdagent/models");
        assert_eq!(resolve(d, "tiny"), "tiny");
        assert_eq!(resolve(d, "/srv/llama"), "/srv/llama");
        assert_eq!(resolve(d, "llama-8b"), "/var/lib/pdagent/models/llama-8b");
    }

    #[test]
    fn copies_match_and_differences_show() {
        let a = tempfile::tempdir().unwrap();
        pd_engine::save_preset_checkpoint(pd_engine::Preset::Tiny, 1, a.path()).unwrap();
        let b = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(a.path()).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), b.path().join(e.file_name())).unwrap();
        }
        let fa = fingerprint(a.path()).unwrap();
        assert_eq!(fa.len(), 16);
        assert_eq!(fingerprint(b.path()).unwrap(), fa, "a copy matches");
        // Hidden files (editors, partial downloads) do not count.
        std::fs::write(b.path().join(".lock"), "x").unwrap();
        assert_eq!(fingerprint(b.path()).unwrap(), fa);
        // Another config, an extra file, or another preset's weights do not match.
        let cfg = std::fs::read_to_string(b.path().join("config.json")).unwrap();
        std::fs::write(b.path().join("config.json"), format!("{cfg} ")).unwrap();
        assert_ne!(fingerprint(b.path()).unwrap(), fa);
        std::fs::write(b.path().join("config.json"), &cfg).unwrap();
        std::fs::write(b.path().join("extra.bin"), "x").unwrap();
        assert_ne!(fingerprint(b.path()).unwrap(), fa);
        let c = tempfile::tempdir().unwrap();
        pd_engine::save_preset_checkpoint(pd_engine::Preset::Small, 1, c.path()).unwrap();
        assert_ne!(fingerprint(c.path()).unwrap(), fa);
        // Missing folder, missing config, truncated weights: said.
        let e = check(a.path(), "nowhere");
        assert!(e.fingerprint.is_none());
        assert!(e.why.unwrap().contains("nowhere/config.json"));
        let w = a.path().join("model.safetensors");
        std::fs::write(&w, [0xff; 16]).unwrap();
        assert!(
            fingerprint(a.path())
                .unwrap_err()
                .contains("not a safetensors")
        );
    }
}
