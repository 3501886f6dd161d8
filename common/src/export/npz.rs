//! A minimal NumPy `.npz` writer: an uncompressed ("stored") zip archive of `.npy` files.
//!
//! NumPy reads it with `np.load`. Only what the reference file needs is here: C-order
//! arrays of a few little-endian dtypes, archives well below 4 GiB (no zip64).

/// Collects arrays, then [`Writer::finish`] lays out the zip.
#[derive(Default)]
pub(crate) struct Writer {
    /// `(file name, .npy bytes)`.
    entries: Vec<(String, Vec<u8>)>,
}

impl Writer {
    pub fn add_u8(&mut self, name: &str, shape: &[usize], data: &[u8]) {
        self.add(name, "|u1", shape, data.to_vec());
    }

    pub fn add_i32(&mut self, name: &str, shape: &[usize], data: &[i32]) {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(name, "<i4", shape, bytes);
    }

    pub fn add_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(name, "<f4", shape, bytes);
    }

    pub fn add_f64(&mut self, name: &str, shape: &[usize], data: &[f64]) {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(name, "<f8", shape, bytes);
    }

    fn add(&mut self, name: &str, descr: &str, shape: &[usize], data: Vec<u8>) {
        debug_assert_eq!(
            shape.iter().product::<usize>() * descr_width(descr),
            data.len(),
            "array '{name}'"
        );
        // The .npy v1.0 header: a Python dict literal padded so the data starts on a
        // 64-byte boundary.
        let dims = match shape {
            [one] => format!("({one},)"),
            _ => format!(
                "({})",
                shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
        let unpadded = 10 + header.len() + 1;
        header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
        header.push('\n');
        let mut npy = Vec::with_capacity(10 + header.len() + data.len());
        npy.extend_from_slice(b"\x93NUMPY\x01\x00");
        npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
        npy.extend_from_slice(header.as_bytes());
        npy.extend_from_slice(&data);
        self.entries.push((format!("{name}.npy"), npy));
    }

    /// The archive: local headers and data, then the central directory.
    pub fn finish(self) -> Vec<u8> {
        // 1980-01-01 00:00 in MS-DOS time/date: a fixed stamp keeps the output
        // reproducible.
        const DOS_TIME: u16 = 0;
        const DOS_DATE: u16 = (1 << 5) | 1;
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in &self.entries {
            let mut crc = flate2::Crc::new();
            crc.update(data);
            let crc = crc.sum();
            let offset = out.len() as u32;
            let size = data.len() as u32;
            let fixed = |buf: &mut Vec<u8>| {
                buf.extend_from_slice(&20u16.to_le_bytes()); // version needed: 2.0
                buf.extend_from_slice(&0u16.to_le_bytes()); // flags
                buf.extend_from_slice(&0u16.to_le_bytes()); // method: stored
                buf.extend_from_slice(&DOS_TIME.to_le_bytes());
                buf.extend_from_slice(&DOS_DATE.to_le_bytes());
                buf.extend_from_slice(&crc.to_le_bytes());
                buf.extend_from_slice(&size.to_le_bytes()); // compressed
                buf.extend_from_slice(&size.to_le_bytes()); // uncompressed
                buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
                buf.extend_from_slice(&0u16.to_le_bytes()); // extra field length
            };
            out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
            fixed(&mut out);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);

            central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            central.extend_from_slice(&20u16.to_le_bytes()); // version made by
            fixed(&mut central);
            central.extend_from_slice(&0u16.to_le_bytes()); // comment length
            central.extend_from_slice(&0u16.to_le_bytes()); // disk number
            central.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
            central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let central_offset = out.len() as u32;
        let count = self.entries.len() as u16;
        out.extend_from_slice(&central);
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // this disk
        out.extend_from_slice(&0u16.to_le_bytes()); // disk with the directory
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&central_offset.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // comment length
        out
    }
}

fn descr_width(descr: &str) -> usize {
    descr[2..].parse().unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_headers_align_data_to_64_bytes_and_the_directory_lists_every_entry() {
        let mut w = Writer::default();
        w.add_u8("a", &[2, 3], &[1, 2, 3, 4, 5, 6]);
        w.add_f64("scalar", &[], &[0.5]);
        let zip = w.finish();
        // Local header of the first entry, its name, then the .npy magic.
        assert_eq!(&zip[..4], b"PK\x03\x04");
        let npy = &zip[30 + "a.npy".len()..];
        assert_eq!(&npy[..6], b"\x93NUMPY");
        let header_len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&npy[10..10 + header_len]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert_eq!(
            &npy[10 + header_len..10 + header_len + 6],
            &[1, 2, 3, 4, 5, 6]
        );
        // End of central directory: two entries.
        let eocd = &zip[zip.len() - 22..];
        assert_eq!(&eocd[..4], b"PK\x05\x06");
        assert_eq!(u16::from_le_bytes([eocd[10], eocd[11]]), 2);
    }
}
