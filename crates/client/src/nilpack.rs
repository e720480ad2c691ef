//! Run-length packing of MessagePack `nil` bytes, for openmls's large stored values.
//!
//! openmls stores a group's message secrets as one value rewritten on every message sent or
//! received; its secret tree and sender ratchets are vectors with one slot per leaf, almost
//! all empty (`nil`, byte `0xc0`). In a 10,000-member group that is ~40 KB of `0xc0` per
//! write. Packing turns each run of `0xc0` into the byte followed by the run's length, so the
//! write is a few hundred bytes and fits one database page.
//!
//! Format: `0xc1` (a byte MessagePack never uses, so plain MessagePack values are told apart
//! by their first byte), then the input with every maximal run of `0xc0` replaced by `0xc0`
//! and the run length as a LEB128 varint (≥ 1). Every input packs losslessly, whatever its
//! meaning. Not for transport: only the profile's own store reads it.

/// The first byte of a packed value; MessagePack reserves it ("never used").
pub const PACKED: u8 = 0xc1;

const NIL: u8 = 0xc0;

/// Values shorter than this are stored as they are (packing would save little, and keys
/// must keep the encoding existing profiles were written with).
pub const MIN_PACKED_INPUT: usize = 1024;

/// Largest value [`unpack`] produces; a packed value claiming more is refused before the
/// memory is allocated.
pub const MAX_UNPACKED: usize = 1 << 30;

/// A packed value that cannot be unpacked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnpackError {
    /// The value does not start with [`PACKED`].
    #[error("not a packed value")]
    NotPacked,
    /// A run length is cut off, zero, or does not fit a `usize`.
    #[error("bad run length at byte {0}")]
    BadRun(usize),
    /// The value would unpack to more than [`MAX_UNPACKED`] bytes.
    #[error("unpacks to more than {MAX_UNPACKED} bytes")]
    TooLarge,
}

/// `raw` packed, or `None` when it is shorter than [`MIN_PACKED_INPUT`] or packing would not
/// save at least a quarter of it. (The codec packs keys too: a key holding random bytes, such
/// as a public key, never qualifies, so its encoding stays what format 3 wrote and lookups of
/// existing rows still match.) The codec packs as it encodes ([`Packer`]); this is the same
/// packing of bytes already written out (for tests and the fuzz target).
pub fn pack(raw: &[u8]) -> Option<Vec<u8>> {
    let mut p = Packer::default();
    p.bytes(raw);
    p.into_packed()
}

/// Packs bytes as they are written, so a long run of `nil` is counted, never written out: the
/// store's encoder ([`crate::msgpack`]) writes into one. Its result is what [`pack`] makes of
/// the same bytes. Until a value reaches [`MIN_PACKED_INPUT`] bytes it only collects them (a
/// pending run is written out plainly when the next other byte comes and the value is still
/// short), so small values cost what a plain buffer does.
pub struct Packer {
    /// Until [`MIN_PACKED_INPUT`] bytes have been written, the bytes as written; from then on
    /// (`packing`) [`PACKED`] and the packed bytes so far, without the pending run.
    out: Vec<u8>,
    packing: bool,
    /// `nil` bytes written since the last other byte, not yet in `out`.
    nils: usize,
    /// `nil` bytes written in the runs already in `out`.
    run_nils: usize,
    /// Bytes those runs take in `out`.
    run_bytes: usize,
}

impl Default for Packer {
    fn default() -> Self {
        Self {
            out: Vec::with_capacity(256),
            packing: false,
            nils: 0,
            run_nils: 0,
            run_bytes: 0,
        }
    }
}

impl Packer {
    /// Write one `nil`.
    #[inline]
    pub fn nil(&mut self) {
        self.nils += 1;
    }

    /// Write one byte.
    #[inline]
    pub fn byte(&mut self, b: u8) {
        if b == NIL {
            self.nils += 1;
        } else {
            if self.nils > 0 {
                self.end_run();
            }
            self.out.push(b);
        }
    }

    /// Write bytes.
    pub fn bytes(&mut self, mut rest: &[u8]) {
        if !self.packing {
            if self.out.len() + self.nils + rest.len() < MIN_PACKED_INPUT {
                self.out.resize(self.out.len() + self.nils, NIL);
                self.nils = 0;
                self.out.extend_from_slice(rest);
                return;
            }
            self.start_packing();
        }
        while !rest.is_empty() {
            // Literal bytes up to the next nil.
            let lit = memchr::memchr(NIL, rest).unwrap_or(rest.len());
            if lit > 0 {
                self.end_run();
                self.out.extend_from_slice(&rest[..lit]);
                rest = &rest[lit..];
            }
            let run = nil_run(rest);
            self.nils += run;
            rest = &rest[run..];
        }
    }

    /// Pack what was collected and go on packing. The pending run follows it.
    #[cold]
    fn start_packing(&mut self) {
        let pending = std::mem::take(&mut self.nils);
        let raw = std::mem::replace(&mut self.out, Vec::with_capacity(MIN_PACKED_INPUT / 2));
        self.out.push(PACKED);
        self.packing = true;
        self.bytes(&raw);
        self.nils += pending;
    }

    /// Put the pending run in `out`: packed, or as it is while collecting (unless that makes
    /// the value long enough to pack).
    #[cold]
    fn end_run(&mut self) {
        if self.nils == 0 {
            return;
        }
        if !self.packing {
            if self.out.len() + self.nils < MIN_PACKED_INPUT {
                self.out.resize(self.out.len() + self.nils, NIL);
                self.nils = 0;
                return;
            }
            self.start_packing();
        }
        let before = self.out.len();
        self.out.push(NIL);
        push_varint(&mut self.out, self.nils);
        self.run_bytes += self.out.len() - before;
        self.run_nils += self.nils;
        self.nils = 0;
    }

    /// Finish: `Ok` with the packed value when packing saves at least a quarter of a value of
    /// [`MIN_PACKED_INPUT`] bytes or more, else `Err` with the packer.
    fn packed(mut self) -> Result<Vec<u8>, Self> {
        if !self.packing && self.out.len() + self.nils >= MIN_PACKED_INPUT {
            self.start_packing();
        }
        self.end_run();
        if !self.packing {
            return Err(self);
        }
        let raw_len = self.out.len() - 1 - self.run_bytes + self.run_nils;
        if self.out.len() <= raw_len / 4 * 3 {
            Ok(self.out)
        } else {
            Err(self)
        }
    }

    /// The packed value, or `None` when it is not worth it.
    fn into_packed(self) -> Option<Vec<u8>> {
        self.packed().ok()
    }

    /// The value as the codec stores it: packed when that is worth it (as [`pack`] decides),
    /// otherwise the bytes as written.
    pub fn finish(self) -> Result<Vec<u8>, UnpackError> {
        self.packed().or_else(Self::into_raw)
    }

    /// Everything written, unpacked.
    pub fn into_raw(mut self) -> Result<Vec<u8>, UnpackError> {
        self.end_run();
        if self.packing {
            unpack(&self.out)
        } else {
            Ok(self.out)
        }
    }
}

/// How many bytes at the start of `s` are nil, eight at a time while they can be.
fn nil_run(s: &[u8]) -> usize {
    const EIGHT_NILS: u64 = u64::from_ne_bytes([NIL; 8]);
    let mut n = 0;
    for chunk in s.chunks_exact(8) {
        let word = u64::from_ne_bytes([
            chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7],
        ]);
        if word != EIGHT_NILS {
            break;
        }
        n += 8;
    }
    n + s[n..].iter().take_while(|&&b| b == NIL).count()
}

fn push_varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// The original bytes of a value made by [`pack`].
pub fn unpack(packed: &[u8]) -> Result<Vec<u8>, UnpackError> {
    let Some((&PACKED, mut rest)) = packed.split_first() else {
        return Err(UnpackError::NotPacked);
    };
    let mut out = Vec::with_capacity(packed.len().saturating_mul(4).min(MAX_UNPACKED));
    while !rest.is_empty() {
        let lit = memchr::memchr(NIL, rest).unwrap_or(rest.len());
        if out.len() + lit > MAX_UNPACKED {
            return Err(UnpackError::TooLarge);
        }
        out.extend_from_slice(&rest[..lit]);
        rest = &rest[lit..];
        let Some((_, after_nil)) = rest.split_first() else {
            break;
        };
        let at = packed.len() - after_nil.len();
        let (run, used) = read_varint(after_nil).ok_or(UnpackError::BadRun(at))?;
        if run == 0 {
            return Err(UnpackError::BadRun(at));
        }
        if run > MAX_UNPACKED - out.len() {
            return Err(UnpackError::TooLarge);
        }
        out.resize(out.len() + run, NIL);
        rest = &after_nil[used..];
    }
    Ok(out)
}

/// A LEB128 varint at the start of `s` and how many bytes it took; `None` if it is cut off
/// or longer than a `usize` holds.
fn read_varint(s: &[u8]) -> Option<(usize, usize)> {
    let mut n: usize = 0;
    for (i, &b) in s.iter().enumerate() {
        let shift = 7 * i as u32;
        if shift >= usize::BITS {
            return None;
        }
        let part = usize::from(b & 0x7f);
        if shift > 0 && part >> (usize::BITS - shift) != 0 {
            return None;
        }
        n |= part << shift;
        if b & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        // A map header, a long nil run, a "secret" holding nil bytes, short runs, a nil at
        // the end: every shape the packer must keep.
        let mut v = vec![0x84, 0xa4, b't', b'r', b'e', b'e'];
        v.extend(std::iter::repeat_n(NIL, 5000));
        v.extend([0xc4, 4, NIL, 1, NIL, NIL]);
        v.extend(std::iter::repeat_n(NIL, 129));
        v.extend((0..=255u8).cycle().take(700));
        v.push(NIL);
        v
    }

    #[test]
    fn packing_round_trips_and_shrinks_nil_runs() {
        let raw = sample();
        let packed = pack(&raw).expect("worth packing");
        assert_eq!(packed[0], PACKED);
        assert!(
            packed.len() < raw.len() / 4,
            "{} vs {}",
            packed.len(),
            raw.len()
        );
        assert_eq!(unpack(&packed).unwrap(), raw);
    }

    #[test]
    fn short_or_incompressible_values_stay_as_they_are() {
        assert_eq!(pack(&[NIL; MIN_PACKED_INPUT - 1]), None);
        // Isolated nils cost two bytes each when packed: not smaller, so left alone; nor is a
        // value that packing shrinks by less than a quarter.
        let mut alternating = Vec::new();
        for i in 0..2000u32 {
            alternating.push(if i % 2 == 0 { NIL } else { 1 });
        }
        assert_eq!(pack(&alternating), None);
        let noise: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 191) as u8).collect();
        assert_eq!(pack(&noise), None);
        let mut mostly_noise = noise.clone();
        mostly_noise.extend([NIL; 800]);
        assert_eq!(
            pack(&mostly_noise),
            None,
            "saves 796 of 4,896 bytes: under a quarter"
        );
        mostly_noise.extend([NIL; 1000]);
        assert!(pack(&mostly_noise).is_some(), "saves 1,796 of 5,896 bytes");
    }

    #[test]
    fn every_run_length_round_trips() {
        for run in [1, 7, 8, 9, 127, 128, 16_383, 16_384, 70_000] {
            let mut raw = vec![1u8; MIN_PACKED_INPUT];
            raw.extend(std::iter::repeat_n(NIL, run));
            raw.push(2);
            if let Some(p) = pack(&raw) {
                assert_eq!(unpack(&p).unwrap(), raw, "run {run}");
            }
        }
    }

    /// Packing written out plainly, byte by byte: the oracle the packer is checked against.
    fn reference_pack(raw: &[u8]) -> Option<Vec<u8>> {
        let mut out = vec![PACKED];
        let mut i = 0;
        while i < raw.len() {
            if raw[i] == NIL {
                let run = raw[i..].iter().take_while(|&&b| b == NIL).count();
                out.push(NIL);
                push_varint(&mut out, run);
                i += run;
            } else {
                out.push(raw[i]);
                i += 1;
            }
        }
        (raw.len() >= MIN_PACKED_INPUT && out.len() <= raw.len() / 4 * 3).then_some(out)
    }

    /// One way of writing to a [`Packer`].
    #[derive(Debug, Clone)]
    enum Write {
        Nils(usize),
        Byte(u8),
        Bytes(Vec<u8>),
    }

    fn write() -> impl proptest::strategy::Strategy<Value = Write> {
        use proptest::prelude::*;
        prop_oneof![
            (1usize..2000).prop_map(Write::Nils),
            prop_oneof![Just(NIL), any::<u8>()].prop_map(Write::Byte),
            proptest::collection::vec(prop_oneof![Just(NIL), any::<u8>()], 0..1500)
                .prop_map(Write::Bytes),
        ]
    }

    proptest::proptest! {
        /// However the bytes arrive (nils counted, single bytes, slices, across the point
        /// where collecting turns into packing), the packer stores what packing them all at
        /// once makes (as `pack` does), and gives them back unpacked.
        #[test]
        fn packing_as_written_equals_packing_afterwards(
            writes in proptest::collection::vec(write(), 0..40)
        ) {
            let (mut p, mut q, mut raw) = (Packer::default(), Packer::default(), Vec::new());
            for w in &writes {
                match w {
                    Write::Nils(n) => {
                        (0..*n).for_each(|_| { p.nil(); q.nil(); });
                        raw.extend(std::iter::repeat_n(NIL, *n));
                    }
                    Write::Byte(b) => {
                        p.byte(*b);
                        q.byte(*b);
                        raw.push(*b);
                    }
                    Write::Bytes(s) => {
                        p.bytes(s);
                        q.bytes(s);
                        raw.extend_from_slice(s);
                    }
                }
            }
            let stored = reference_pack(&raw).unwrap_or(raw.clone());
            proptest::prop_assert_eq!(pack(&raw).unwrap_or(raw.clone()), stored.clone());
            proptest::prop_assert_eq!(p.finish().unwrap(), stored);
            proptest::prop_assert_eq!(q.into_raw().unwrap(), raw);
        }
    }

    #[test]
    fn damaged_packed_values_are_refused_without_allocating() {
        assert_eq!(unpack(&[]), Err(UnpackError::NotPacked));
        assert_eq!(unpack(&[0x84, NIL]), Err(UnpackError::NotPacked));
        // A run cut off, a zero run, a run that overflows usize.
        assert_eq!(unpack(&[PACKED, 1, NIL]), Err(UnpackError::BadRun(3)));
        assert_eq!(unpack(&[PACKED, NIL, 0x80]), Err(UnpackError::BadRun(2)));
        assert_eq!(unpack(&[PACKED, NIL, 0]), Err(UnpackError::BadRun(2)));
        let mut huge = vec![PACKED, NIL];
        huge.extend([0xff; 9]);
        huge.push(0x7f);
        assert_eq!(unpack(&huge), Err(UnpackError::BadRun(2)));
        // A run claiming 2^40 bytes: refused before any allocation of that size.
        let mut big = vec![PACKED, NIL];
        push_varint(&mut big, 1 << 40);
        assert_eq!(unpack(&big), Err(UnpackError::TooLarge));
    }
}
