//! A writer of PyTorch's serialization as `torch.save` lays it out: a
//! protocol-2 pickle of an `OrderedDict` state dict and a zip of stored,
//! 64-byte-aligned members (test data for the restricted reader).

use reshard::DType;
use std::collections::HashMap;

/// One tensor to save: name, dtype, shape, storage key, element offset.
pub struct T<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Storage key (tensors sharing one storage share the key).
    pub key: &'a str,
    /// Offset in elements.
    pub offset: u64,
}

fn storage_class(d: DType) -> &'static str {
    match d {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F64 => "DoubleStorage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::I8 => "CharStorage",
        DType::U8 => "ByteStorage",
        DType::Bool => "BoolStorage",
        other => panic!("torch has no storage for {other}"),
    }
}

/// Python's `pickle.Pickler(protocol=2)` for the values torch.save emits.
#[derive(Default)]
pub struct Pickler {
    pub out: Vec<u8>,
    memo: HashMap<String, u32>,
    next: u32,
}

impl Pickler {
    fn put(&mut self) -> u32 {
        let k = self.next;
        self.next += 1;
        if k < 256 {
            self.out.extend([b'q', k as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend(k.to_le_bytes());
        }
        k
    }
    fn get(&mut self, k: u32) {
        if k < 256 {
            self.out.extend([b'h', k as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend(k.to_le_bytes());
        }
    }
    /// A memoized object (strings, globals) by identity key.
    fn memoized(&mut self, id: String, write: impl FnOnce(&mut Self)) {
        if let Some(&k) = self.memo.get(&id) {
            self.get(k);
            return;
        }
        write(self);
        let k = self.put();
        self.memo.insert(id, k);
    }
    pub fn str(&mut self, s: &str) {
        self.memoized(format!("s:{s}"), |p| {
            p.out.push(b'X');
            p.out.extend((s.len() as u32).to_le_bytes());
            p.out.extend(s.as_bytes());
        });
    }
    pub fn global(&mut self, module: &str, name: &str) {
        self.memoized(format!("g:{module}.{name}"), |p| {
            p.out.push(b'c');
            p.out.extend(format!("{module}\n{name}\n").as_bytes());
        });
    }
    pub fn int(&mut self, v: u64) {
        if v < 256 {
            self.out.extend([b'K', v as u8]);
        } else if v < 65536 {
            self.out.push(b'M');
            self.out.extend((v as u16).to_le_bytes());
        } else if v < (1 << 31) {
            self.out.push(b'J');
            self.out.extend((v as u32).to_le_bytes());
        } else {
            let mut b = v.to_le_bytes().to_vec();
            while b.len() > 1 && b[b.len() - 1] == 0 && b[b.len() - 2] & 0x80 == 0 {
                b.pop();
            }
            if b[b.len() - 1] & 0x80 != 0 {
                b.push(0);
            }
            self.out.extend([0x8a, b.len() as u8]);
            self.out.extend(b);
        }
    }
    /// A tuple of ints, memoized like any non-empty tuple.
    pub fn int_tuple(&mut self, v: &[u64]) {
        if v.is_empty() {
            self.out.push(b')');
            return;
        }
        if v.len() > 3 {
            self.out.push(b'(');
        }
        for &x in v {
            self.int(x);
        }
        self.out.push(match v.len() {
            1 => 0x85,
            2 => 0x86,
            3 => 0x87,
            _ => b't',
        });
        self.put();
    }
    /// `OrderedDict()`: the class, `()`, REDUCE, memoized.
    pub fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.extend([b')', b'R']);
        self.put();
    }
    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
    pub fn tensor(&mut self, t: &T, storage_numel: u64) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        // The persistent id ('storage', torch.XStorage, key, 'cpu', numel).
        self.out.push(b'(');
        self.str("storage");
        self.global("torch", storage_class(t.dtype));
        self.str(t.key);
        self.str("cpu");
        self.int(storage_numel);
        self.out.push(b't');
        self.put();
        self.out.push(b'Q');
        self.int(t.offset);
        self.int_tuple(&t.shape);
        let mut stride = vec![1u64; t.shape.len()];
        for i in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * t.shape[i + 1];
        }
        self.int_tuple(&stride);
        self.out.push(0x89);
        self.empty_ordered_dict();
        self.out.push(b't');
        self.put();
        self.out.push(b'R');
        self.put();
    }
}

/// The `data.pkl` of a state dict: an OrderedDict of tensors with
/// `_metadata` set by BUILD, as `model.state_dict()` pickles.
pub fn state_dict_pickle(tensors: &[T], numel: &HashMap<String, u64>) -> Vec<u8> {
    let mut p = Pickler::default();
    p.out.extend([0x80, 2]);
    p.empty_ordered_dict();
    p.out.push(b'(');
    for t in tensors {
        p.str(t.name);
        p.tensor(t, numel[t.key]);
    }
    p.out.push(b'u');
    // state: {'_metadata': OrderedDict([('', {'version': 1})])}
    p.out.push(b'}');
    p.put();
    p.str("_metadata");
    p.empty_ordered_dict();
    p.str("");
    p.out.push(b'}');
    p.put();
    p.str("version");
    p.int(1);
    p.out.push(b's');
    p.out.push(b's');
    p.out.push(b's');
    p.out.push(b'b');
    p.out.push(b'.');
    p.out
}

/// A ZIP of stored members, each member's data aligned to 64 bytes by
/// padding its local header's extra field, as PyTorchFileWriter does.
pub fn zip(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in members {
        let offset = out.len();
        let crc = crc32fast::hash(data);
        let header = 30 + name.len() + 4;
        let pad = (64 - (offset + header) % 64) % 64;
        let le16 = |v: usize| (v as u16).to_le_bytes();
        let le32 = |v: usize| (v as u32).to_le_bytes();
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend(le16(20));
        out.extend(le16(0));
        out.extend(le16(0)); // stored
        out.extend([0u8; 4]); // time, date
        out.extend(crc.to_le_bytes());
        out.extend(le32(data.len()));
        out.extend(le32(data.len()));
        out.extend(le16(name.len()));
        out.extend(le16(4 + pad));
        out.extend(name.as_bytes());
        out.extend(0x4246u16.to_le_bytes()); // "FB" padding field
        out.extend(le16(pad));
        out.extend(vec![b'Z'; pad]);
        assert_eq!(out.len() % 64, 0);
        out.extend(data);
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend(le16(20));
        central.extend(le16(20));
        central.extend(le16(0));
        central.extend(le16(0));
        central.extend([0u8; 4]);
        central.extend(crc.to_le_bytes());
        central.extend(le32(data.len()));
        central.extend(le32(data.len()));
        central.extend(le16(name.len()));
        central.extend(le16(0));
        central.extend(le16(0));
        central.extend(le16(0));
        central.extend(le16(0));
        central.extend(le32(0));
        central.extend(le32(offset));
        central.extend(name.as_bytes());
    }
    let dir_offset = out.len();
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend((members.len() as u16).to_le_bytes());
    out.extend((members.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend((dir_offset as u32).to_le_bytes());
    out.extend([0u8; 2]);
    out
}

/// A whole `torch.save` archive: `tensors` viewing `storages` (key →
/// bytes), under the archive folder `root`.
pub fn archive(root: &str, pkl: Vec<u8>, storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut members = vec![
        (format!("{root}/data.pkl"), pkl),
        (format!("{root}/.format_version"), b"1".to_vec()),
        (format!("{root}/.storage_alignment"), b"64".to_vec()),
        (format!("{root}/byteorder"), b"little".to_vec()),
    ];
    for (k, b) in storages {
        members.push((format!("{root}/data/{k}"), b.clone()));
    }
    members.push((format!("{root}/version"), b"3\n".to_vec()));
    members.push((
        format!("{root}/.data/serialization_id"),
        b"1234567890123456789012345678901234567890".to_vec(),
    ));
    zip(&members)
}

/// A state dict of separate contiguous tensors, as `torch.save` writes it.
pub fn save(tensors: &[(String, DType, Vec<u64>, Vec<u8>)]) -> Vec<u8> {
    let keys: Vec<String> = (0..tensors.len()).map(|i| i.to_string()).collect();
    let ts: Vec<T> = tensors
        .iter()
        .zip(&keys)
        .map(|((n, d, s, _), k)| T {
            name: n,
            dtype: *d,
            shape: s.clone(),
            key: k,
            offset: 0,
        })
        .collect();
    let numel: HashMap<String, u64> = tensors
        .iter()
        .zip(&keys)
        .map(|((_, d, _, b), k)| (k.clone(), (b.len() / d.size()) as u64))
        .collect();
    let pkl = state_dict_pickle(&ts, &numel);
    let storages: Vec<(&str, Vec<u8>)> = tensors
        .iter()
        .zip(&keys)
        .map(|((_, _, _, b), k)| (k.as_str(), b.clone()))
        .collect();
    archive("archive", pkl, &storages)
}
