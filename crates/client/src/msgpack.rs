//! The store codec's MessagePack encoder: byte for byte what `rmp_serde::to_vec_named` writes
//! (so keys and values of existing profiles keep their encoding), written straight into a
//! [`Packer`] so runs of `nil` are packed as they are produced.
//!
//! Why not `rmp_serde` itself: openmls rewrites a group's message secrets on every message,
//! and in a 10,000-member group that value is ~40,000 mostly empty slots. Through `rmp_serde`
//! each empty slot cost a trip through its generic writer and error plumbing, ~40 % of a
//! message's CPU at 10,000 members (BENCHMARKS.md); here it is one counter increment. Byte
//! vectors (`Vec<u8>`, which serde hands over one `u8` at a time) are encoded in one pass into
//! a plain buffer ([`Encoder::byte_seq`]). Decoding stays with `rmp_serde`, which reads what
//! this writes.
//!
//! The encoding, as `rmp_serde` 1.3 with its default configuration and struct maps: integers
//! in their smallest form, structs as maps from field name to value, `None` and `()` as `nil`,
//! `Some(v)` as `v`, unit structs as an empty array, enum variants by name (`{name: value}`
//! unless the variant is a unit), byte strings as `bin`, 128-bit integers as 16 big-endian
//! bytes, and not human-readable. Extension types (`rmp_serde::MSGPACK_EXT_STRUCT_NAME`) are
//! refused: nothing the store holds uses them.

use serde::ser::{self, Serialize};

use crate::nilpack::{Packer, UnpackError};

/// A value that could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EncodeError(String);

impl ser::Error for EncodeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

impl From<UnpackError> for EncodeError {
    fn from(e: UnpackError) -> Self {
        Self(e.to_string())
    }
}

/// `value` as MessagePack, packed when that is worth it ([`Packer::finish`]).
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let mut e = Encoder::default();
    value.serialize(&mut e)?;
    Ok(e.out.finish()?)
}

/// Most bytes [`Encoder::byte_seq`] sets aside before it has seen them (it grows past this).
const BYTE_RUN_START_MAX: usize = 1 << 20;

/// The name `rmp_serde` gives its extension-type newtype.
const EXT_STRUCT_NAME: &str = "_ExtStruct";

#[derive(Default)]
struct Encoder {
    out: Packer,
    /// A byte vector's encoding on its way to `out` ([`Encoder::byte_seq`]), kept for reuse.
    byte_run: Vec<u8>,
}

type Result<T = (), E = EncodeError> = std::result::Result<T, E>;

impl Encoder {
    fn marker_u8(&mut self, marker: u8, v: u8) {
        self.out.byte(marker);
        self.out.byte(v);
    }

    fn marker_u16(&mut self, marker: u8, v: u16) {
        self.out.byte(marker);
        self.out.bytes(&v.to_be_bytes());
    }

    fn marker_u32(&mut self, marker: u8, v: u32) {
        self.out.byte(marker);
        self.out.bytes(&v.to_be_bytes());
    }

    #[inline]
    fn uint(&mut self, v: u64) {
        if v < 128 {
            self.out.byte(v as u8);
        } else if v < 256 {
            self.marker_u8(0xcc, v as u8);
        } else if v < 65_536 {
            self.marker_u16(0xcd, v as u16);
        } else if let Ok(v) = u32::try_from(v) {
            self.marker_u32(0xce, v);
        } else {
            self.out.byte(0xcf);
            self.out.bytes(&v.to_be_bytes());
        }
    }

    fn sint(&mut self, v: i64) {
        if v >= 0 {
            self.uint(v as u64);
        } else if v >= -32 {
            self.out.byte(v as u8);
        } else if v >= -128 {
            self.marker_u8(0xd0, v as u8);
        } else if v >= -32_768 {
            self.marker_u16(0xd1, v as u16);
        } else if let Ok(v) = i32::try_from(v) {
            self.marker_u32(0xd2, v as u32);
        } else {
            self.out.byte(0xd3);
            self.out.bytes(&v.to_be_bytes());
        }
    }

    /// A length header: the fix form below `fix_limit` (`fix | len`), else the 8-bit form
    /// (if the kind has one), the 16-bit form or the 32-bit form. Lengths are taken modulo
    /// 2^32, as `rmp_serde` takes them.
    fn len(&mut self, len: usize, fix: Option<(u8, u32)>, m8: Option<u8>, m16: u8, m32: u8) {
        let len = len as u32;
        match (fix, m8) {
            (Some((fix, limit)), _) if len < limit => self.out.byte(fix | len as u8),
            (_, Some(m8)) if len < 256 => self.marker_u8(m8, len as u8),
            _ if len < 65_536 => self.marker_u16(m16, len as u16),
            _ => self.marker_u32(m32, len),
        }
    }

    fn str(&mut self, s: &str) {
        self.len(s.len(), Some((0xa0, 32)), Some(0xd9), 0xda, 0xdb);
        self.out.bytes(s.as_bytes());
    }

    fn bin(&mut self, b: &[u8]) {
        self.len(b.len(), None, Some(0xc4), 0xc5, 0xc6);
        self.out.bytes(b);
    }

    /// The rest of a sequence whose first item was the byte `first` (a `Vec<u8>`, as openmls
    /// stores every key, secret and signature): each byte encoded as `uint` encodes it, into a
    /// plain buffer, which goes to the packer in one call. Every merged commit writes the
    /// whole ratchet tree, ~2.7 MB of such bytes at 1,000 members; byte by byte through the
    /// packer, encoding it was ~60 % of a merge (BENCHMARKS.md, "Applying a commit"). An item
    /// that is not a byte is encoded as usual, after the bytes before it. Never inlined, so
    /// `collect_seq` stays as small as it was for every other sequence.
    #[inline(never)]
    fn byte_seq<I>(&mut self, first: u8, items: I) -> Result
    where
        I: Iterator,
        I::Item: Serialize,
    {
        let mut run = std::mem::take(&mut self.byte_run);
        run.clear();
        // Room for the whole sequence if its size hint is honest, capped: a hint is only a hint.
        let room = items.size_hint().0.saturating_add(1).saturating_mul(2);
        run.resize(room.min(BYTE_RUN_START_MAX), 0);
        let mut len = put_uint8(&mut run, 0, first);
        for item in items {
            match item.serialize(ByteProbe) {
                Ok(b) => {
                    if run.len() < len + 2 {
                        run.resize(2 * run.len() + 2, 0);
                    }
                    len += put_uint8(&mut run, len, b);
                }
                Err(NotAByte) => {
                    self.out.bytes(&run[..len]);
                    len = 0;
                    item.serialize(&mut *self)?;
                }
            }
        }
        self.out.bytes(&run[..len]);
        self.byte_run = run;
        Ok(())
    }

    fn array_len(&mut self, len: usize) {
        self.len(len, Some((0x90, 16)), None, 0xdc, 0xdd);
    }

    fn map_len(&mut self, len: usize) {
        self.len(len, Some((0x80, 16)), None, 0xde, 0xdf);
    }
}

/// A sequence or map: written in place when its length is known, otherwise into a buffer of
/// its own and counted, then written after its header (as `rmp_serde` does).
struct Compound<'a> {
    e: &'a mut Encoder,
    /// Writes the header: an array's or a map's length.
    header: fn(&mut Encoder, usize),
    unknown: Option<(Encoder, usize)>,
}

impl<'a> Compound<'a> {
    fn new(e: &'a mut Encoder, len: Option<usize>, header: fn(&mut Encoder, usize)) -> Self {
        let unknown = match len {
            Some(len) => {
                header(e, len);
                None
            }
            None => Some((Encoder::default(), 0)),
        };
        Self { e, header, unknown }
    }

    /// Write an element, or a map's key (`counts`) or value.
    fn item<T: Serialize + ?Sized>(&mut self, v: &T, counts: bool) -> Result {
        match &mut self.unknown {
            None => v.serialize(&mut *self.e),
            Some((buf, count)) => {
                *count += usize::from(counts);
                v.serialize(buf)
            }
        }
    }

    fn finish(self) -> Result {
        if let Some((buf, count)) = self.unknown {
            (self.header)(self.e, count);
            self.e.out.bytes(&buf.out.into_raw()?);
        }
        Ok(())
    }
}

impl<'a> ser::Serializer for &'a mut Encoder {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn is_human_readable(&self) -> bool {
        false
    }

    fn serialize_bool(self, v: bool) -> Result {
        self.out.byte(if v { 0xc3 } else { 0xc2 });
        Ok(())
    }

    fn serialize_i8(self, v: i8) -> Result {
        self.serialize_i64(v.into())
    }

    fn serialize_i16(self, v: i16) -> Result {
        self.serialize_i64(v.into())
    }

    fn serialize_i32(self, v: i32) -> Result {
        self.serialize_i64(v.into())
    }

    fn serialize_i64(self, v: i64) -> Result {
        self.sint(v);
        Ok(())
    }

    fn serialize_i128(self, v: i128) -> Result {
        self.serialize_bytes(&v.to_be_bytes())
    }

    fn serialize_u8(self, v: u8) -> Result {
        self.serialize_u64(v.into())
    }

    fn serialize_u16(self, v: u16) -> Result {
        self.serialize_u64(v.into())
    }

    fn serialize_u32(self, v: u32) -> Result {
        self.serialize_u64(v.into())
    }

    fn serialize_u64(self, v: u64) -> Result {
        self.uint(v);
        Ok(())
    }

    fn serialize_u128(self, v: u128) -> Result {
        self.serialize_bytes(&v.to_be_bytes())
    }

    fn serialize_f32(self, v: f32) -> Result {
        self.out.byte(0xca);
        self.out.bytes(&v.to_bits().to_be_bytes());
        Ok(())
    }

    fn serialize_f64(self, v: f64) -> Result {
        self.out.byte(0xcb);
        self.out.bytes(&v.to_bits().to_be_bytes());
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result {
        self.str(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    fn serialize_str(self, v: &str) -> Result {
        self.str(v);
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result {
        self.bin(v);
        Ok(())
    }

    #[inline]
    fn serialize_none(self) -> Result {
        self.out.nil();
        Ok(())
    }

    #[inline]
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result {
        v.serialize(self)
    }

    fn serialize_unit(self) -> Result {
        self.out.nil();
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result {
        self.array_len(0);
        Ok(())
    }

    fn serialize_unit_variant(self, _name: &'static str, _i: u32, variant: &'static str) -> Result {
        self.str(variant);
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, name: &'static str, v: &T) -> Result {
        if name == EXT_STRUCT_NAME {
            return Err(EncodeError(
                "MessagePack extension types are not stored".into(),
            ));
        }
        v.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _i: u32,
        variant: &'static str,
        v: &T,
    ) -> Result {
        self.map_len(1);
        self.str(variant);
        v.serialize(self)
    }

    /// Sequences of known length (every `Vec`) in one loop, without a [`Compound`].
    fn collect_seq<I>(self, iter: I) -> Result
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        let mut iter = iter.into_iter();
        match iter.size_hint() {
            (lo, Some(hi)) if lo == hi => {
                self.array_len(lo);
                let Some(first) = iter.next() else {
                    return Ok(());
                };
                match first.serialize(ByteProbe) {
                    Ok(b) => self.byte_seq(b, iter),
                    Err(NotAByte) => {
                        first.serialize(&mut *self)?;
                        iter.try_for_each(|item| item.serialize(&mut *self))
                    }
                }
            }
            _ => {
                let mut seq = Compound::new(self, None, Encoder::array_len);
                iter.try_for_each(|item| seq.item(&item, true))?;
                seq.finish()
            }
        }
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Compound<'a>> {
        Ok(Compound::new(self, len, Encoder::array_len))
    }

    fn serialize_tuple(self, len: usize) -> Result<Self> {
        self.array_len(len);
        Ok(self)
    }

    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Self> {
        self.array_len(len);
        Ok(self)
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _i: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self> {
        self.map_len(1);
        self.str(variant);
        self.array_len(len);
        Ok(self)
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Compound<'a>> {
        Ok(Compound::new(self, len, Encoder::map_len))
    }

    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<Self> {
        self.map_len(len);
        Ok(self)
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _i: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self> {
        self.map_len(1);
        self.str(variant);
        self.map_len(len);
        Ok(self)
    }
}

impl ser::SerializeSeq for Compound<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result {
        self.item(v, true)
    }

    fn end(self) -> Result {
        self.finish()
    }
}

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result {
        self.item(k, true)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result {
        self.item(v, false)
    }

    fn end(self) -> Result {
        self.finish()
    }
}

/// Tuples, tuple structs and tuple variants: their elements in order, after the header
/// `serialize_*` wrote.
macro_rules! elements {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for &mut Encoder {
            type Ok = ();
            type Error = EncodeError;

            #[inline]
            fn $method<T: Serialize + ?Sized>(&mut self, v: &T) -> Result {
                v.serialize(&mut **self)
            }

            fn end(self) -> Result {
                Ok(())
            }
        }
    )*};
}

elements!(
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// Structs and struct variants: each field as its name and its value, after the map header
/// `serialize_*` wrote.
macro_rules! named_fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for &mut Encoder {
            type Ok = ();
            type Error = EncodeError;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                v: &T,
            ) -> Result {
                self.str(key);
                v.serialize(&mut **self)
            }

            fn end(self) -> Result {
                Ok(())
            }
        }
    )*};
}

named_fields!(SerializeStruct, SerializeStructVariant);

/// Writes `b` as [`Encoder::uint`] does (`b`, or `0xcc b` from 128 on) at `run[at..]`, which
/// has room for two bytes, and returns how many it wrote. Without a branch: keys and
/// signatures are random bytes, half of them 128 or more, and a branch on that was
/// mispredicted every other byte.
#[inline(always)]
fn put_uint8(run: &mut [u8], at: usize, b: u8) -> usize {
    let wide = usize::from(b >= 128);
    run[at] = 0xcc;
    run[at + wide] = b;
    1 + wide
}

/// A serializer that only answers whether a value is a `u8`, and which: how
/// [`Encoder::byte_seq`] tells byte vectors from other sequences without specialisation.
struct ByteProbe;

/// [`ByteProbe`]'s answer for anything but a `u8`.
#[derive(Debug)]
struct NotAByte;

impl std::fmt::Display for NotAByte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not a byte")
    }
}

impl std::error::Error for NotAByte {}

impl ser::Error for NotAByte {
    fn custom<T: std::fmt::Display>(_msg: T) -> Self {
        NotAByte
    }
}

/// `fn $name(self, _: $arg) -> Result<u8, NotAByte> { Err(NotAByte) }` for each.
macro_rules! not_a_byte {
    ($($name:ident($($arg:ty),*)),* $(,)?) => {
        $(fn $name(self, $(_: $arg),*) -> Result<u8, NotAByte> {
            Err(NotAByte)
        })*
    };
}

impl ser::Serializer for ByteProbe {
    type Ok = u8;
    type Error = NotAByte;
    type SerializeSeq = ser::Impossible<u8, NotAByte>;
    type SerializeTuple = ser::Impossible<u8, NotAByte>;
    type SerializeTupleStruct = ser::Impossible<u8, NotAByte>;
    type SerializeTupleVariant = ser::Impossible<u8, NotAByte>;
    type SerializeMap = ser::Impossible<u8, NotAByte>;
    type SerializeStruct = ser::Impossible<u8, NotAByte>;
    type SerializeStructVariant = ser::Impossible<u8, NotAByte>;

    #[inline]
    fn serialize_u8(self, v: u8) -> Result<u8, NotAByte> {
        Ok(v)
    }

    not_a_byte!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_none(),
        serialize_unit(),
        serialize_unit_struct(&'static str),
        serialize_unit_variant(&'static str, u32, &'static str),
    );

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<u8, NotAByte> {
        Err(NotAByte)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<u8, NotAByte> {
        Err(NotAByte)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<u8, NotAByte> {
        Err(NotAByte)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, NotAByte> {
        Err(NotAByte)
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, NotAByte> {
        Err(NotAByte)
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, NotAByte> {
        Err(NotAByte)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, NotAByte> {
        Err(NotAByte)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, NotAByte> {
        Err(NotAByte)
    }

    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, NotAByte> {
        Err(NotAByte)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, NotAByte> {
        Err(NotAByte)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::BTreeMap;

    use openmls::prelude::*;
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::RustCrypto;
    use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
    use openmls_traits::OpenMlsProvider;
    use serde::Serialize;
    use serde::ser::{SerializeMap, SerializeSeq, Serializer};

    use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};

    use super::*;
    use crate::nilpack::{MIN_PACKED_INPUT, pack};

    /// What the codec stored before this encoder: `rmp_serde`, then packed where worth it.
    fn expected<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
        let raw = rmp_serde::to_vec_named(v).unwrap();
        pack(&raw).unwrap_or(raw)
    }

    fn same<T: Serialize + ?Sized + std::fmt::Debug>(v: &T) {
        assert_eq!(to_vec(v).unwrap(), expected(v), "{v:?}");
    }

    /// Byte strings (`serialize_bytes`).
    #[derive(Debug)]
    struct Bin(Vec<u8>);
    impl Serialize for Bin {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    /// A sequence and a map whose lengths are not given up front.
    #[derive(Debug)]
    struct Unsized(Vec<Option<u8>>);
    impl Serialize for Unsized {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(None)?;
            for x in &self.0 {
                seq.serialize_element(x)?;
            }
            seq.end()
        }
    }
    /// A sequence collected from an iterator that does not know its length.
    #[derive(Debug)]
    struct Filtered(Vec<Option<u8>>);
    impl Serialize for Filtered {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().filter(|x| x != &&Some(0)))
        }
    }
    #[derive(Debug)]
    struct UnsizedMap(Vec<(String, Option<i64>)>);
    impl Serialize for UnsizedMap {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(None)?;
            for (k, v) in &self.0 {
                map.serialize_entry(k, v)?;
            }
            map.end()
        }
    }

    #[derive(Debug, Serialize)]
    struct Unit;
    #[derive(Debug, Serialize)]
    struct Pair(u16, i8);
    #[derive(Debug, Serialize)]
    struct Newtype(u32);
    #[derive(Debug, Serialize)]
    enum Kind {
        Empty,
        Wrapped(Vec<u8>),
        Two(u8, String),
        Named { a: Option<bool>, b: f32 },
    }
    #[derive(Debug, Serialize)]
    struct Everything {
        unit: (),
        unit_struct: Unit,
        pair: Pair,
        newtype: Newtype,
        kinds: Vec<Kind>,
        ch: char,
        floats: (f32, f64),
        wide: (i128, u128),
        map: BTreeMap<String, Vec<Option<u64>>>,
        tuple: (bool, bool, [u8; 3]),
    }

    /// Sequence items that are bytes or strings, by turns.
    #[derive(Debug, Serialize)]
    #[serde(untagged)]
    enum ByteOrText {
        Byte(u8),
        Text(String),
    }

    #[test]
    fn byte_vectors_are_encoded_as_rmp_serde_encodes_them() {
        let every: Vec<u8> = (0..=255).collect();
        same(&Vec::<u8>::new());
        same(&every);
        // Long enough to be packed, with `nil`-valued bytes (0xc0) among them.
        same(&every.repeat(8));
        same(&vec![0xc0u8; 3 * MIN_PACKED_INPUT]);
        same(&(vec![None::<u8>; 2 * MIN_PACKED_INPUT], every.repeat(4)));
        // Nested, and beside other values.
        same(&vec![vec![1u8, 200], vec![], every.clone()]);
        same(&(vec![7u8; 5], "x", vec![0x80u8; 2000], Some(vec![0u8])));
        // Bytes, then something else, then bytes again; and something else first.
        use ByteOrText::{Byte, Text};
        same(&vec![
            Byte(1),
            Byte(0xc0),
            Text("t".into()),
            Byte(255),
            Byte(0),
        ]);
        same(&vec![Text("t".into()), Byte(0xcc), Byte(3)]);
        same(
            &[Byte(200)]
                .into_iter()
                .chain((0..3000).map(|i| Byte(i as u8)))
                .collect::<Vec<_>>(),
        );
    }

    proptest::proptest! {
        /// Byte vectors of any content and length, alone and among other values, are encoded
        /// as `rmp_serde` encodes them (then packed as `pack` packs them).
        #[test]
        fn any_byte_vector_is_encoded_as_rmp_serde_encodes_it(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6000),
            nils in 0usize..3000,
        ) {
            proptest::prop_assert_eq!(to_vec(&bytes).unwrap(), expected(&bytes));
            let beside = (vec![None::<u8>; nils], &bytes, "end", vec![bytes.clone(), vec![]]);
            proptest::prop_assert_eq!(to_vec(&beside).unwrap(), expected(&beside));
        }
    }

    #[test]
    fn every_kind_of_value_is_encoded_as_rmp_serde_encodes_it() {
        for n in [
            0u64,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64,
            1 << 32,
            u64::MAX,
        ] {
            same(&n);
        }
        for n in [
            -1i64,
            -32,
            -33,
            -128,
            -129,
            -32_768,
            -32_769,
            i32::MIN as i64,
            i32::MIN as i64 - 1,
            i64::MIN,
            0,
            127,
            128,
            i64::MAX,
        ] {
            same(&n);
        }
        for len in [0, 31, 32, 255, 256, 65_535, 65_536] {
            same(&"s".repeat(len));
            same(&Bin(vec![0xc0; len]));
            same(&vec![None::<u8>; len]);
            let map: BTreeMap<u32, ()> = (0..len as u32).map(|i| (i, ())).collect();
            same(&map);
        }
        same(&Unsized(vec![Some(1), None, None, Some(0xc0)]));
        same(&Unsized(vec![None; 5000]));
        same(&Filtered(vec![Some(0), None, Some(1), Some(0xc0)]));
        same(&Filtered(vec![None; 3000]));
        same(&UnsizedMap(vec![
            ("a".into(), None),
            ("b".into(), Some(-5)),
        ]));
        same(&UnsizedMap(
            (0..300).map(|i| (format!("k{i}"), None)).collect(),
        ));
        let everything = Everything {
            unit: (),
            unit_struct: Unit,
            pair: Pair(300, -7),
            newtype: Newtype(70_000),
            kinds: vec![
                Kind::Empty,
                Kind::Wrapped(vec![1, 2, 0xc0]),
                Kind::Two(9, "x".into()),
                Kind::Named { a: None, b: 1.5 },
            ],
            ch: 'é',
            floats: (-0.25, f64::MAX),
            wide: (-1, u128::MAX),
            map: [
                ("nils".into(), vec![None; 2000]),
                ("some".into(), vec![Some(3)]),
            ]
            .into_iter()
            .collect(),
            tuple: (true, false, [0xc0, 0, 0xc0]),
        };
        same(&everything);
        // Large and packed, small and plain, large and not worth packing.
        assert_eq!(
            to_vec(&vec![None::<u8>; 5000]).unwrap()[0],
            crate::nilpack::PACKED
        );
        assert_ne!(
            to_vec(&vec![None::<u8>; 10]).unwrap()[0],
            crate::nilpack::PACKED
        );
        let noise = Bin((0..MIN_PACKED_INPUT as u32 * 2).map(|i| i as u8).collect());
        assert_ne!(to_vec(&noise).unwrap()[0], crate::nilpack::PACKED);
        same(&noise);
    }

    thread_local! {
        static CHECKED: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    }

    /// The store's codec, except that every value it encodes is also encoded by `rmp_serde`
    /// and compared (counted in `CHECKED`: values, values that differed).
    #[derive(Default)]
    struct Checking;
    impl Codec for Checking {
        type Error = crate::store::CodecError;
        fn to_vec<T: Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
            let ours = crate::store::MsgpackCodec::to_vec(value)?;
            let differs = ours != expected(value);
            CHECKED.with(|c| {
                let (n, bad) = c.get();
                c.set((n + 1, bad + usize::from(differs)));
            });
            Ok(ours)
        }
        fn from_slice<T: serde::de::DeserializeOwned>(s: &[u8]) -> Result<T, Self::Error> {
            crate::store::MsgpackCodec::from_slice(s)
        }
    }

    struct Provider {
        crypto: RustCrypto,
        storage: SqliteStorageProvider<Checking, rusqlite::Connection>,
    }
    impl Provider {
        fn new() -> Self {
            let mut storage =
                SqliteStorageProvider::new(rusqlite::Connection::open_in_memory().unwrap());
            storage.run_migrations().unwrap();
            Self {
                crypto: RustCrypto::default(),
                storage,
            }
        }
    }
    impl OpenMlsProvider for Provider {
        type CryptoProvider = RustCrypto;
        type RandProvider = RustCrypto;
        type StorageProvider = SqliteStorageProvider<Checking, rusqlite::Connection>;
        fn storage(&self) -> &Self::StorageProvider {
            &self.storage
        }
        fn crypto(&self) -> &RustCrypto {
            &self.crypto
        }
        fn rand(&self) -> &RustCrypto {
            &self.crypto
        }
    }

    fn member(p: &Provider, name: &str) -> (SignatureKeyPair, CredentialWithKey) {
        let cs = crate::CLASSIC_CIPHERSUITE;
        let signer = SignatureKeyPair::new(cs.signature_algorithm()).unwrap();
        signer.store(p.storage()).unwrap();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        (signer, credential)
    }

    fn kp(p: &Provider, name: &str) -> KeyPackage {
        let (signer, credential) = member(p, name);
        KeyPackage::builder()
            .build(crate::CLASSIC_CIPHERSUITE, p, &signer, credential)
            .unwrap()
            .key_package()
            .clone()
    }

    fn process(group: &mut MlsGroup, p: &Provider, out: MlsMessageOut) -> ProcessedMessageContent {
        let bytes = out.tls_serialize_detached().unwrap();
        let msg = MlsMessageIn::tls_deserialize_exact(&bytes).unwrap();
        let processed = group
            .process_message(p, msg.try_into_protocol_message().unwrap())
            .unwrap();
        processed.into_content()
    }

    #[test]
    fn every_value_openmls_stores_is_encoded_as_rmp_serde_encodes_it() {
        let (a, b, scratch) = (Provider::new(), Provider::new(), Provider::new());
        let (a_signer, a_cred) = member(&a, "alice");
        let mut group_a = MlsGroup::builder()
            .ciphersuite(crate::CLASSIC_CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .build(&a, &a_signer, a_cred)
            .unwrap();
        // Enough members that the message secrets are large and stored packed.
        let mut kps = vec![kp(&b, "bob")];
        kps.extend((0..300).map(|i| kp(&scratch, &format!("m{i}"))));
        let (_, welcome, _) = group_a.add_members(&a, &a_signer, &kps).unwrap();
        group_a.merge_pending_commit(&a).unwrap();
        let welcome =
            MlsMessageIn::tls_deserialize_exact(welcome.tls_serialize_detached().unwrap()).unwrap();
        let MlsMessageBodyIn::Welcome(welcome) = welcome.extract() else {
            panic!("not a welcome");
        };
        let mut group_b =
            StagedWelcome::new_from_welcome(&b, &MlsGroupJoinConfig::default(), welcome, None)
                .unwrap()
                .into_group(&b)
                .unwrap();
        let b_signer = SignatureKeyPair::read(
            b.storage(),
            group_b.own_leaf_node().unwrap().signature_key().as_slice(),
            crate::CLASSIC_CIPHERSUITE.signature_algorithm(),
        )
        .unwrap();
        for i in 0..3u8 {
            let m = group_a.create_message(&a, &a_signer, &[i; 40]).unwrap();
            assert!(matches!(
                process(&mut group_b, &b, m),
                ProcessedMessageContent::ApplicationMessage(_)
            ));
            let m = group_b.create_message(&b, &b_signer, &[i; 40]).unwrap();
            assert!(matches!(
                process(&mut group_a, &a, m),
                ProcessedMessageContent::ApplicationMessage(_)
            ));
        }
        // A commit from the joiner, then a removal: trees, epochs and past secrets.
        let commit = group_b
            .self_update(&b, &b_signer, LeafNodeParameters::default())
            .unwrap()
            .commit()
            .clone();
        group_b.merge_pending_commit(&b).unwrap();
        let ProcessedMessageContent::StagedCommitMessage(staged) =
            process(&mut group_a, &a, commit)
        else {
            panic!("not a commit");
        };
        group_a.merge_staged_commit(&a, *staged).unwrap();
        let last = group_a.members().last().unwrap().index;
        group_a.remove_members(&a, &a_signer, &[last]).unwrap();
        group_a.merge_pending_commit(&a).unwrap();
        let (checked, differed) = CHECKED.with(Cell::get);
        assert!(checked > 300, "{checked} values checked");
        assert_eq!(differed, 0, "of {checked}");
    }
}
