//! Setup results a run keeps in its output directory beside the checkpoint, so that
//! `--resume` reads back the very bits the run searched with instead of recomputing them:
//! the distillation teacher's logits (`search.fitness = "distill"`, `teacher.bin`) and the
//! block-local phase's targets (`search.local_evaluations`, `blocks.bin`).
//!
//! Why files rather than recomputing: both come from the float engine, whose matrix
//! products pick their kernels by CPU (FMA or not, vector width), so a coordinator resumed
//! on another node could compute values that differ in the last bits (a block target
//! that differs by one code), and every fitness after the resume with them. Reading back
//! the same bits keeps a resumed run identical to an uninterrupted one. It also saves the
//! setup time (45,000 float forwards for ResNet-20's teacher).
//!
//! Format: one ASCII header line `<magic> <version> <dimension>... <crc32 hex>`, then the
//! body (the product of the dimensions, times the element size, in bytes). The file is
//! written atomically (temporary file, then rename) and removed with the checkpoint when
//! the run completes.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Error;

/// One kind of kept setup result: its file, header and shape.
#[derive(Debug)]
pub struct Artifact {
    file: &'static str,
    magic: &'static str,
    version: u32,
    /// What each header dimension counts, for error messages.
    dims: &'static [&'static str],
    /// Bytes per element of the body.
    unit: usize,
}

/// The float model's logits on every search image: `images x classes` little-endian f32.
pub const TEACHER: Artifact = Artifact {
    file: "teacher.bin",
    magic: "ccq-teacher",
    version: 1,
    dims: &["images", "classes"],
    unit: 4,
};

/// The float model's codes at every block end for the local pool: per end in network
/// order, `images` rows of that end's codes ("codes per image" is their total over the
/// ends; which end has how many is the network's, checked by the checkpoint).
pub const BLOCKS: Artifact = Artifact {
    file: "blocks.bin",
    magic: "ccq-blocks",
    version: 1,
    dims: &["images", "codes per image"],
    unit: 1,
};

impl Artifact {
    /// Where a run in `dir` keeps it.
    pub fn path(&self, dir: &Path) -> PathBuf {
        dir.join(self.file)
    }

    /// Writes `body`, of shape `dims`, to `dir` atomically.
    pub fn save(&self, dir: &Path, dims: &[usize], body: &[u8]) -> Result<(), Error> {
        debug_assert_eq!(dims.len(), self.dims.len());
        debug_assert_eq!(Some(body.len()), self.body_len(dims));
        let file = self.path(dir);
        let tmp = dir.join(format!("{}.tmp", self.file));
        let io = |p: &Path, e| Error::Common(ccq_common::Error::io(p, e));
        let dims: Vec<String> = dims.iter().map(usize::to_string).collect();
        let head = format!(
            "{} {} {} {:08x}\n",
            self.magic,
            self.version,
            dims.join(" "),
            crc32fast::hash(body)
        );
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(head.as_bytes())
            .and_then(|()| f.write_all(body))
            .and_then(|()| f.sync_all())
            .map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &file).map_err(|e| io(&file, e))
    }

    /// The body saved in `dir`, which must have shape `dims`; `Ok(None)` if there is no
    /// file. A file that is there but does not fit is an error naming it.
    pub fn load(&self, dir: &Path, dims: &[usize]) -> Result<Option<Vec<u8>>, Error> {
        let file = self.path(dir);
        let mut bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Common(ccq_common::Error::io(&file, e))),
        };
        let bad = |reason: String| Error::Checkpoint {
            path: file.display().to_string(),
            reason,
        };
        let nl = (bytes.iter().position(|&b| b == b'\n'))
            .filter(|&n| n < 128)
            .ok_or_else(|| bad(format!("no header line: not a {} file", self.magic)))?;
        let head =
            std::str::from_utf8(&bytes[..nl]).map_err(|_| bad("header is not text".into()))?;
        let fields: Vec<&str> = head.split(' ').collect();
        if fields.len() != self.dims.len() + 3 {
            return Err(bad(format!(
                "header {head:?}: expected {} fields",
                self.dims.len() + 3
            )));
        }
        if fields[0] != self.magic || fields[1] != self.version.to_string() {
            return Err(bad(format!(
                "header {head:?}: this build reads {} version {}",
                self.magic, self.version
            )));
        }
        let found = (fields[2..fields.len() - 1].iter())
            .map(|s| {
                s.parse::<usize>()
                    .map_err(|_| bad(format!("header {head:?}: {s:?} is not a count")))
            })
            .collect::<Result<Vec<usize>, _>>()?;
        if found != dims {
            return Err(bad(format!(
                "holds {}; this run needs {}",
                self.shape(&found),
                self.shape(dims)
            )));
        }
        let body = &bytes[nl + 1..];
        if Some(body.len()) != self.body_len(dims) {
            return Err(bad(format!(
                "truncated: {} bytes for {}",
                body.len(),
                self.shape(dims)
            )));
        }
        let actual = crc32fast::hash(body);
        let crc = fields[fields.len() - 1];
        if format!("{actual:08x}") != crc {
            return Err(bad(format!(
                "corrupted: checksum (CRC32) {actual:08x}, the header says {crc}"
            )));
        }
        bytes.drain(..=nl);
        Ok(Some(bytes))
    }

    /// Removes the file of a completed run (nothing to resume any more).
    pub fn remove(&self, dir: &Path) {
        let _ = std::fs::remove_file(self.path(dir));
    }

    fn body_len(&self, dims: &[usize]) -> Option<usize> {
        (dims.iter()).try_fold(self.unit, |acc, &d| acc.checked_mul(d))
    }

    /// `3 images x 2 classes`.
    fn shape(&self, dims: &[usize]) -> String {
        let parts: Vec<String> = (dims.iter().zip(self.dims))
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
        parts.join(" x ")
    }
}

/// Saves the teacher's logits (`classes` per image).
pub fn save_teacher(dir: &Path, logits: &[f32], classes: usize) -> Result<(), Error> {
    let body: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    TEACHER.save(dir, &[logits.len() / classes.max(1), classes], &body)
}

/// The teacher's logits saved in `dir` for `images` x `classes`, if there are any.
pub fn load_teacher(dir: &Path, images: usize, classes: usize) -> Result<Option<Vec<f32>>, Error> {
    Ok(TEACHER.load(dir, &[images, classes])?.map(|body| {
        (body.chunks_exact(4))
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }))
}

/// Saves the block targets: `ends[k]` holds `images` rows of `ends[k].len() / images`
/// codes each.
pub fn save_blocks(dir: &Path, images: usize, ends: &[Vec<u8>]) -> Result<(), Error> {
    let body: Vec<u8> = ends.concat();
    let per_image = body.len() / images.max(1);
    BLOCKS.save(dir, &[images, per_image], &body)
}

/// The block targets saved in `dir` for `images` images and block ends of `per_image`
/// codes each (in network order), split per end, if there are any.
pub fn load_blocks(
    dir: &Path,
    images: usize,
    per_image: &[usize],
) -> Result<Option<Vec<Vec<u8>>>, Error> {
    let total = per_image.iter().sum();
    let Some(body) = BLOCKS.load(dir, &[images, total])? else {
        return Ok(None);
    };
    let mut rest = &body[..];
    Ok(Some(
        (per_image.iter())
            .map(|&p| {
                let (end, tail) = rest.split_at(p * images);
                rest = tail;
                end.to_vec()
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_logits_load_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            load_teacher(dir.path(), 3, 2).unwrap().is_none(),
            "no file yet"
        );
        let logits = [1.5f32, -0.0, f32::MIN_POSITIVE, 3e-9, -7.25, 1e30];
        save_teacher(dir.path(), &logits, 2).unwrap();
        let back = load_teacher(dir.path(), 3, 2).unwrap().unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&logits));
        assert!(!dir.path().join("teacher.bin.tmp").exists());
        TEACHER.remove(dir.path());
        assert!(load_teacher(dir.path(), 3, 2).unwrap().is_none());
    }

    #[test]
    fn saved_block_targets_load_back_split_per_end() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_blocks(dir.path(), 2, &[3, 1]).unwrap().is_none());
        let (a, b) = ([1u8, 2, 3, 4, 5, 6], [7u8, 8]);
        save_blocks(dir.path(), 2, &[a.to_vec(), b.to_vec()]).unwrap();
        let back = load_blocks(dir.path(), 2, &[3, 1]).unwrap().unwrap();
        assert_eq!(back, vec![a.to_vec(), b.to_vec()]);
        let err = load_blocks(dir.path(), 2, &[1, 1]).unwrap_err().to_string();
        assert!(
            err.contains("holds 2 images x 4 codes per image; this run needs 2 images x 2"),
            "{err}"
        );
        assert!(err.contains("blocks.bin"), "{err}");
        BLOCKS.remove(dir.path());
        assert!(!BLOCKS.path(dir.path()).exists());
    }

    /// A file that does not fit the run is refused with the file named, never used.
    #[test]
    fn a_file_that_does_not_fit_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        save_teacher(dir.path(), &[1.0; 6], 2).unwrap();
        let err = |images, classes| {
            load_teacher(dir.path(), images, classes)
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(6, 1).contains("holds 3 images x 2 classes; this run needs 6 images x 1 classes"),
            "{}",
            err(6, 1)
        );
        let file = TEACHER.path(dir.path());
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
        std::fs::write(&file, b"ccq-teacher 1 3 x 0\n").unwrap();
        assert!(err(3, 2).contains("\"x\" is not a count"), "{}", err(3, 2));
        std::fs::write(&file, [0xff; 300]).unwrap();
        assert!(err(3, 2).contains("no header line"), "{}", err(3, 2));
        assert!(err(3, 2).contains("teacher.bin"), "{}", err(3, 2));
    }
}
