//! The float teacher of the distillation fitness (`search.fitness = "distill"`): its
//! logits on every image of the search range, computed once per run and kept in the
//! output directory beside the checkpoint.
//!
//! Why a file rather than recomputing on `--resume`: the float engine's matrix products
//! pick their kernels by CPU (FMA or not, vector width), so a coordinator resumed on
//! another node could compute logits that differ in the last bits, and every fitness
//! after the resume with them. Reading back the very same bits keeps a resumed run
//! identical to an uninterrupted one. It also saves the setup time (45,000 float
//! forwards for ResNet-20).
//!
//! Format: one ASCII header line `ccq-teacher 1 <images> <classes> <crc32 hex>`, then
//! `images * classes` little-endian f32. The file is written atomically (temporary file,
//! then rename) and removed with the checkpoint when the run completes.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Error;

const MAGIC: &str = "ccq-teacher";
const VERSION: u32 = 1;

/// Where a run in `dir` keeps its teacher logits.
pub fn path(dir: &Path) -> PathBuf {
    dir.join("teacher.bin")
}

/// Writes `logits` (`classes` per image) to `dir` atomically.
pub fn save(dir: &Path, logits: &[f32], classes: usize) -> Result<(), Error> {
    let file = path(dir);
    let tmp = dir.join("teacher.bin.tmp");
    let io = |p: &Path, e| Error::Common(ccq_common::Error::io(p, e));
    let body: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let images = logits.len() / classes.max(1);
    let head = format!(
        "{MAGIC} {VERSION} {images} {classes} {:08x}\n",
        crc32fast::hash(&body)
    );
    let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(head.as_bytes())
        .and_then(|()| f.write_all(&body))
        .and_then(|()| f.sync_all())
        .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &file).map_err(|e| io(&file, e))
}

/// The logits saved in `dir`, which must be `images` rows of `classes`; `Ok(None)` if
/// there is no file. A file that is there but does not fit is an error naming it.
pub fn load(dir: &Path, images: usize, classes: usize) -> Result<Option<Vec<f32>>, Error> {
    let file = path(dir);
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Common(ccq_common::Error::io(&file, e))),
    };
    let bad = |reason: String| Error::Checkpoint {
        path: file.display().to_string(),
        reason,
    };
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .filter(|&n| n < 128)
        .ok_or_else(|| bad("no header line: not a teacher logits file".into()))?;
    let head = std::str::from_utf8(&bytes[..nl]).map_err(|_| bad("header is not text".into()))?;
    let fields: Vec<&str> = head.split(' ').collect();
    let [magic, version, n, c, crc] = fields[..] else {
        return Err(bad(format!("header {head:?}: expected 5 fields")));
    };
    if magic != MAGIC || version != VERSION.to_string() {
        return Err(bad(format!(
            "header {head:?}: this build reads {MAGIC} version {VERSION}"
        )));
    }
    let number = |s: &str| {
        s.parse::<usize>()
            .map_err(|_| bad(format!("header {head:?}: {s:?} is not a count")))
    };
    let (n, c) = (number(n)?, number(c)?);
    if (n, c) != (images, classes) {
        return Err(bad(format!(
            "holds {n} images x {c} classes; this run needs {images} x {classes}"
        )));
    }
    let body = &bytes[nl + 1..];
    if Some(body.len()) != n.checked_mul(c).and_then(|v| v.checked_mul(4)) {
        return Err(bad(format!(
            "truncated: {} bytes of logits for {n} x {c}",
            body.len()
        )));
    }
    let actual = crc32fast::hash(body);
    if format!("{actual:08x}") != crc {
        return Err(bad(format!(
            "corrupted: checksum (CRC32) {actual:08x}, the header says {crc}"
        )));
    }
    Ok(Some(
        body.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    ))
}

/// Removes the file of a completed run (nothing to resume any more).
pub fn remove(dir: &Path) {
    let _ = std::fs::remove_file(path(dir));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_logits_load_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), 3, 2).unwrap().is_none(), "no file yet");
        let logits = [1.5f32, -0.0, f32::MIN_POSITIVE, 3e-9, -7.25, 1e30];
        save(dir.path(), &logits, 2).unwrap();
        let back = load(dir.path(), 3, 2).unwrap().unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&logits));
        assert!(!dir.path().join("teacher.bin.tmp").exists());
        remove(dir.path());
        assert!(load(dir.path(), 3, 2).unwrap().is_none());
    }

    /// A file that does not fit the run is refused with the file named, never used.
    #[test]
    fn a_file_that_does_not_fit_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &[1.0; 6], 2).unwrap();
        let err = |images, classes| load(dir.path(), images, classes).unwrap_err().to_string();
        assert!(
            err(6, 1).contains("holds 3 images x 2 classes"),
            "{}",
            err(6, 1)
        );
        let file = path(dir.path());
        let good = std::fs::read(&file).unwrap();
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&file, &flipped).unwrap();
        assert!(err(3, 2).contains("corrupted"), "{}", err(3, 2));
        std::fs::write(&file, &good[..good.len() - 1]).unwrap();
        assert!(err(3, 2).contains("truncated"), "{}", err(3, 2));
        std::fs::write(&file, b"something else\n").unwrap();
        assert!(err(3, 2).contains("expected 5 fields"), "{}", err(3, 2));
        std::fs::write(&file, b"ccq-teacher 2 3 2 0\n").unwrap();
        assert!(err(3, 2).contains("version 1"), "{}", err(3, 2));
        std::fs::write(&file, [0xff; 300]).unwrap();
        assert!(err(3, 2).contains("no header line"), "{}", err(3, 2));
        assert!(err(3, 2).contains("teacher.bin"), "{}", err(3, 2));
    }
}
