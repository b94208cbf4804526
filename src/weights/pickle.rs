//! A restricted pickle reader for PyTorch files: it builds a value tree and never runs code.
//!
//! Python's unpickler imports and calls whatever the pickle names (`os.system` included),
//! so a `.ckpt` from the internet can run anything. This one knows a short allowlist of
//! globals and *models* them: tensor rebuilds become [`TensorRef`] descriptors, containers
//! become plain values, a few benign classes found in real checkpoints (Lightning
//! callbacks, numpy scalars) become inert [`Value::Opaque`] placeholders. Any other global
//! is refused before anything is built from it.
//!
//! Objects live in an arena while the pickle runs, because pickle fills containers after
//! memoizing them (`EMPTY_DICT; BINPUT; ...; SETITEMS`); the finished tree is then copied
//! out with limits on depth and size, so cycles and exponential sharing are refused too.

use std::collections::HashMap;

use safetensors::Dtype;

/// A tensor as the pickle describes it; its bytes are the zip entry `data/<storage>`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: String,
    pub dtype: Dtype,
    /// Elements in the storage (the tensor may view a part of it).
    pub storage_numel: usize,
    /// In elements, like `stride`.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorRef {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major and dense, so the bytes are one slice of the storage.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&size, &stride) in self.shape.iter().zip(&self.stride).rev() {
            // Dimensions of size 1 may carry any stride.
            if size != 1 && stride != expected {
                return false;
            }
            expected *= size;
        }
        true
    }
}

/// A pickled object, as far as sdw models it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// Lists, tuples and sets.
    List(Vec<Value>),
    /// Dicts and `OrderedDict`s, in pickle order; keys need not be strings.
    Dict(Vec<(Value, Value)>),
    Tensor(TensorRef),
    /// A benign object sdw does not model (a Lightning callback, a numpy scalar): its class.
    Opaque(String),
}

impl Value {
    /// The entry under a string key, for a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub enum PickleError {
    /// The pickle names a global outside the allowlist (`module.name`).
    Unsafe(String),
    Malformed(String),
}

fn malformed<T>(why: impl Into<String>) -> Result<T, PickleError> {
    Err(PickleError::Malformed(why.into()))
}

/// Runs the pickle in `bytes` and returns the object it builds.
pub fn parse(bytes: &[u8]) -> Result<Value, PickleError> {
    let mut vm =
        Vm { input: bytes, pos: 0, objs: Vec::new(), stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    let root = vm.run()?;
    let mut budget = vm.objs.len() + MAX_EXTRA_NODES;
    vm.to_value(root, 0, &mut budget)
}

/// Deeper nesting than this is refused (it also catches reference cycles).
const MAX_DEPTH: usize = 256;
/// Values the tree may have beyond the arena's objects, through shared references.
const MAX_EXTRA_NODES: usize = 1 << 20;
/// Fields of torch's storage persistent id.
const STORAGE_PID_LEN: usize = 5;

/// Callables and classes the reader knows; each is modelled, never called.
#[derive(Clone, Debug)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(Dtype),
    Size,
    Set,
    /// `copyreg._reconstructor(cls, base, state)`: protocol 0/1 object creation.
    Reconstructor,
    /// `torch.nn.ParameterDict`: old textual-inversion files keep their vectors in one.
    ParameterDict,
    /// A benign class or function whose result sdw does not need.
    Inert(String),
}

/// Benign globals that real checkpoints carry outside the weights (training state).
const INERT: &[(&str, &str)] = &[
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("torch", "device"),
    ("torch", "float16"),
    ("torch", "float32"),
    ("torch", "bfloat16"),
];

fn storage_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "FloatStorage" => Dtype::F32,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "DoubleStorage" => Dtype::F64,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::BOOL,
        _ => return None,
    })
}

/// The allowlist: anything not named here is refused.
fn resolve_global(module: &str, name: &str) -> Result<Global, PickleError> {
    if let Some(dtype) = storage_dtype(name).filter(|_| module == "torch") {
        return Ok(Global::Storage(dtype));
    }
    let global = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => Global::RebuildParameter,
        ("torch", "Size") => Global::Size,
        ("builtins" | "__builtin__", "set" | "frozenset") => Global::Set,
        ("copyreg" | "copy_reg", "_reconstructor") => Global::Reconstructor,
        ("torch.nn.modules.container", "ParameterDict") => Global::ParameterDict,
        _ if INERT.contains(&(module, name)) => Global::Inert(format!("{module}.{name}")),
        _ => return Err(PickleError::Unsafe(format!("{module}.{name}"))),
    };
    Ok(global)
}

type Id = usize;

/// An object while the pickle runs; containers refer to other objects by arena id.
#[derive(Clone, Debug)]
enum Obj {
    Value(Value),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(Global),
    Storage {
        dtype: Dtype,
        key: String,
        numel: usize,
    },
    /// A `ParameterDict` and the state `BUILD` gave it.
    Module {
        state: Option<Id>,
    },
}

struct Vm<'a> {
    input: &'a [u8],
    pos: usize,
    objs: Vec<Obj>,
    stack: Vec<Id>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

impl<'a> Vm<'a> {
    fn run(&mut self) -> Result<Id, PickleError> {
        loop {
            let at = self.pos;
            let op = self.take(1)?[0];
            if op == b'.' {
                return self.pop();
            }
            self.step(op).map_err(|e| match e {
                PickleError::Malformed(why) => {
                    PickleError::Malformed(format!("{why} (opcode 0x{op:02x} at byte {at})"))
                }
                unsafe_global => unsafe_global,
            })?;
        }
    }

    fn step(&mut self, op: u8) -> Result<(), PickleError> {
        match op {
            0x80 => self.skip(1)?,                                           // PROTO
            0x95 => self.skip(8)?,                                           // FRAME: a length hint
            b'(' => self.marks.push(self.stack.len()),                       // MARK
            b'0' => self.pop().map(|_| ())?,                                 // POP
            b'1' => self.pop_mark().map(|_| ())?,                            // POP_MARK
            b'2' => self.push_id(*self.stack.last().ok_or_else(underflow)?), // DUP
            b'N' => self.push_value(Value::None),
            0x88 => self.push_value(Value::Bool(true)),
            0x89 => self.push_value(Value::Bool(false)),
            b'J' => self.read_int(4, true)?,  // BININT
            b'K' => self.read_int(1, false)?, // BININT1
            b'M' => self.read_int(2, false)?, // BININT2
            0x8a => {
                // LONG1
                let n = self.take(1)?[0] as usize;
                self.read_int(n, true)?
            }
            0x8b => {
                // LONG4
                let n = self.read_len(4)?;
                self.read_int(n, true)?
            }
            b'G' => {
                // BINFLOAT, big-endian
                let b = self.take(8)?;
                self.push_value(Value::Float(f64::from_be_bytes(b.try_into().unwrap_or_default())))
            }
            b'X' => self.read_str(4)?,                 // BINUNICODE
            0x8c => self.read_str(1)?,                 // SHORT_BINUNICODE
            0x8d => self.read_str(8)?,                 // BINUNICODE8
            b'T' => self.read_latin1(4)?,              // BINSTRING (Python 2 str)
            b'U' => self.read_latin1(1)?,              // SHORT_BINSTRING
            b'B' => self.read_bytes(4)?,               // BINBYTES
            b'C' => self.read_bytes(1)?,               // SHORT_BINBYTES
            0x8e | 0x96 => self.read_bytes(8)?,        // BINBYTES8, BYTEARRAY8
            b')' => self.push(Obj::Tuple(Vec::new())), // EMPTY_TUPLE
            b't' => {
                // TUPLE
                let items = self.pop_mark()?;
                self.push(Obj::Tuple(items))
            }
            0x85..=0x87 => {
                // TUPLE1..3
                let n = (op - 0x84) as usize;
                let at = self.stack.len().checked_sub(n).ok_or_else(underflow)?;
                let items = self.stack.split_off(at);
                self.push(Obj::Tuple(items))
            }
            b']' => self.push(Obj::List(Vec::new())), // EMPTY_LIST
            b'l' => {
                // LIST
                let items = self.pop_mark()?;
                self.push(Obj::List(items))
            }
            b'a' => {
                // APPEND
                let item = self.pop()?;
                self.extend(vec![item])?
            }
            b'e' | 0x90 => {
                // APPENDS, ADDITEMS
                let items = self.pop_mark()?;
                self.extend(items)?
            }
            0x8f => self.push(Obj::List(Vec::new())), // EMPTY_SET
            0x91 => {
                // FROZENSET
                let items = self.pop_mark()?;
                self.push(Obj::List(items))
            }
            b'}' => self.push(Obj::Dict(Vec::new())), // EMPTY_DICT
            b'd' => {
                // DICT
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                self.push(Obj::Dict(pairs))
            }
            b's' => {
                // SETITEM
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![(k, v)])?
            }
            b'u' => {
                // SETITEMS
                let items = self.pop_mark()?;
                self.set_items(pairs(items)?)?
            }
            b'q' => {
                // BINPUT
                let i = self.take(1)?[0] as u32;
                self.memo_put(i)?
            }
            b'r' => {
                // LONG_BINPUT
                let i = self.read_u32()?;
                self.memo_put(i)?
            }
            0x94 => self.memo_put(self.memo.len() as u32)?, // MEMOIZE
            b'h' => {
                // BINGET
                let i = self.take(1)?[0] as u32;
                self.memo_get(i)?
            }
            b'j' => {
                // LONG_BINGET
                let i = self.read_u32()?;
                self.memo_get(i)?
            }
            b'c' => {
                // GLOBAL "module\nname\n"
                let module = self.read_line()?;
                let name = self.read_line()?;
                let g = resolve_global(&module, &name)?;
                self.push(Obj::Global(g))
            }
            0x93 => {
                // STACK_GLOBAL
                let name = self.pop_str()?;
                let module = self.pop_str()?;
                let g = resolve_global(&module, &name)?;
                self.push(Obj::Global(g))
            }
            b'i' => {
                // INST "module\nname\n" + marked args
                let module = self.read_line()?;
                let name = self.read_line()?;
                let g = resolve_global(&module, &name)?;
                self.pop_mark()?; // constructor arguments: unused
                let obj = instantiate(&g)?;
                self.push(obj)
            }
            b'o' => {
                // OBJ: marked class + args
                let items = self.pop_mark()?;
                let cls = *items.first().ok_or_else(underflow)?;
                let obj = instantiate(self.global(cls)?)?;
                self.push(obj)
            }
            b'R' => {
                // REDUCE
                let args = self.pop()?;
                let f = self.pop()?;
                self.call(f, args)?
            }
            0x81 | 0x92 => {
                // NEWOBJ, NEWOBJ_EX
                if op == 0x92 {
                    self.pop()?; // kwargs
                }
                self.pop()?; // args
                let cls = self.pop()?;
                let obj = instantiate(self.global(cls)?)?;
                self.push(obj)
            }
            b'b' => {
                // BUILD
                let state = self.pop()?;
                let target = *self.stack.last().ok_or_else(underflow)?;
                // Only a ParameterDict's state matters; other objects' attributes are unused.
                if let Obj::Module { state: s } = &mut self.objs[target] {
                    *s = Some(state);
                }
            }
            b'Q' => {
                // BINPERSID
                let pid = self.pop()?;
                let storage = self.storage(pid)?;
                self.push(storage)
            }
            0x82..=0x84 => return malformed("the copyreg extension registry (EXT opcodes) is not supported"),
            b'P' | b'I' | b'L' | b'F' | b'S' | b'V' | b'p' | b'g' => {
                return malformed("text-mode (protocol 0) opcodes are not supported");
            }
            _ => return malformed("unknown pickle opcode"),
        }
        Ok(())
    }

    // --- input ---

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.input.len());
        let Some(end) = end else { return malformed("the pickle ends in the middle of an instruction") };
        let bytes = &self.input[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn skip(&mut self, n: usize) -> Result<(), PickleError> {
        self.take(n).map(|_| ())
    }

    fn read_u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()))
    }

    /// A little-endian unsigned length of `width` bytes.
    fn read_len(&mut self, width: usize) -> Result<usize, PickleError> {
        let b = self.take(width)?;
        let mut le = [0u8; 8];
        le[..width].copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(le)).or_else(|_| malformed("length out of range"))
    }

    /// A little-endian integer of `n` bytes (two's complement when `signed`).
    fn read_int(&mut self, n: usize, signed: bool) -> Result<(), PickleError> {
        if n > 8 {
            return malformed("integer wider than 64 bits");
        }
        let b = self.take(n)?;
        let negative = signed && b.last().is_some_and(|&x| x & 0x80 != 0);
        let mut le = [if negative { 0xff } else { 0 }; 8];
        le[..n].copy_from_slice(b);
        self.push_value(Value::Int(i64::from_le_bytes(le)));
        Ok(())
    }

    fn read_bytes(&mut self, width: usize) -> Result<(), PickleError> {
        let n = self.read_len(width)?;
        let b = self.take(n)?.to_vec();
        self.push_value(Value::Bytes(b));
        Ok(())
    }

    fn read_str(&mut self, width: usize) -> Result<(), PickleError> {
        let n = self.read_len(width)?;
        let s = std::str::from_utf8(self.take(n)?).or_else(|_| malformed("a string is not valid UTF-8"))?;
        self.push_value(Value::Str(s.to_owned()));
        Ok(())
    }

    fn read_latin1(&mut self, width: usize) -> Result<(), PickleError> {
        let n = self.read_len(width)?;
        let s = self.take(n)?.iter().map(|&b| b as char).collect();
        self.push_value(Value::Str(s));
        Ok(())
    }

    fn read_line(&mut self) -> Result<String, PickleError> {
        let rest = &self.input[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else { return malformed("unterminated GLOBAL name") };
        let line = std::str::from_utf8(&rest[..n]).or_else(|_| malformed("a GLOBAL name is not UTF-8"))?;
        self.pos += n + 1;
        Ok(line.to_owned())
    }

    // --- stack and memo ---

    fn push(&mut self, obj: Obj) {
        self.objs.push(obj);
        self.stack.push(self.objs.len() - 1);
    }

    fn push_value(&mut self, v: Value) {
        self.push(Obj::Value(v))
    }

    fn push_id(&mut self, id: Id) {
        self.stack.push(id)
    }

    fn pop(&mut self) -> Result<Id, PickleError> {
        self.stack.pop().ok_or_else(underflow)
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let Some(at) = self.marks.pop() else { return malformed("no MARK to pop to") };
        if at > self.stack.len() {
            return Err(underflow());
        }
        Ok(self.stack.split_off(at))
    }

    fn pop_str(&mut self) -> Result<String, PickleError> {
        let id = self.pop()?;
        match &self.objs[id] {
            Obj::Value(Value::Str(s)) => Ok(s.clone()),
            _ => malformed("STACK_GLOBAL needs two strings"),
        }
    }

    fn memo_put(&mut self, i: u32) -> Result<(), PickleError> {
        let top = *self.stack.last().ok_or_else(underflow)?;
        self.memo.insert(i, top);
        Ok(())
    }

    fn memo_get(&mut self, i: u32) -> Result<(), PickleError> {
        let Some(&id) = self.memo.get(&i) else {
            return malformed(format!("memo entry {i} is read before it is written"));
        };
        self.push_id(id);
        Ok(())
    }

    // --- containers ---

    fn extend(&mut self, items: Vec<Id>) -> Result<(), PickleError> {
        let target = *self.stack.last().ok_or_else(underflow)?;
        match &mut self.objs[target] {
            Obj::List(list) => list.extend(items),
            _ => return malformed("APPEND to something that is not a list"),
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<(Id, Id)>) -> Result<(), PickleError> {
        let target = *self.stack.last().ok_or_else(underflow)?;
        match &mut self.objs[target] {
            Obj::Dict(dict) => dict.extend(items),
            _ => return malformed("SETITEM on something that is not a dict"),
        }
        Ok(())
    }

    fn items(&self, id: Id) -> Result<&[Id], PickleError> {
        match &self.objs[id] {
            Obj::Tuple(v) | Obj::List(v) => Ok(v),
            _ => malformed("expected a tuple"),
        }
    }

    fn global(&self, id: Id) -> Result<&Global, PickleError> {
        match &self.objs[id] {
            Obj::Global(g) => Ok(g),
            _ => malformed("calls something that is not a global"),
        }
    }

    fn int(&self, id: Id) -> Result<usize, PickleError> {
        match &self.objs[id] {
            Obj::Value(Value::Int(i)) => usize::try_from(*i).or_else(|_| malformed("a negative size or offset")),
            _ => malformed("expected an integer"),
        }
    }

    fn ints(&self, id: Id) -> Result<Vec<usize>, PickleError> {
        self.items(id)?.iter().map(|&i| self.int(i)).collect()
    }

    // --- the modelled globals ---

    /// REDUCE: what calling an allowlisted global would return, built without calling it.
    fn call(&mut self, f: Id, args: Id) -> Result<(), PickleError> {
        let g = self.global(f)?.clone();
        let args = self.items(args)?.to_vec();
        let obj = match g {
            Global::RebuildTensor => Obj::Value(Value::Tensor(self.rebuild_tensor(&args)?)),
            // A Parameter is its tensor: push the tensor object itself.
            Global::RebuildParameter => {
                self.push_id(*args.first().ok_or_else(underflow)?);
                return Ok(());
            }
            Global::OrderedDict if !args.is_empty() => {
                let items = self.items(args[0])?.to_vec();
                let pairs = items.iter().map(|&p| self.items(p).and_then(pair)).collect::<Result<_, _>>()?;
                Obj::Dict(pairs)
            }
            Global::Size | Global::Set if !args.is_empty() => Obj::Tuple(self.items(args[0])?.to_vec()),
            Global::Reconstructor => instantiate(self.global(*args.first().ok_or_else(underflow)?)?)?,
            other => instantiate(&other)?,
        };
        self.push(obj);
        Ok(())
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    fn rebuild_tensor(&self, args: &[Id]) -> Result<TensorRef, PickleError> {
        if args.len() < 4 {
            return malformed("_rebuild_tensor_v2 with too few arguments");
        }
        let Obj::Storage { dtype, key, numel } = &self.objs[args[0]] else {
            return malformed("_rebuild_tensor_v2 without a storage");
        };
        let t = TensorRef {
            storage: key.clone(),
            dtype: *dtype,
            storage_numel: *numel,
            offset: self.int(args[1])?,
            shape: self.ints(args[2])?,
            stride: self.ints(args[3])?,
        };
        check_bounds(&t)?;
        Ok(t)
    }

    /// BINPERSID `('storage', storage_type, key, location, numel)`.
    fn storage(&self, pid: Id) -> Result<Obj, PickleError> {
        let items = self.items(pid)?;
        let [tag, ty, key, _location, numel] = items else {
            return malformed(format!("a persistent id with {} fields, torch writes {STORAGE_PID_LEN}", items.len()));
        };
        let (Obj::Value(Value::Str(tag)), Obj::Global(Global::Storage(dtype)), Obj::Value(Value::Str(key))) =
            (&self.objs[*tag], &self.objs[*ty], &self.objs[*key])
        else {
            return malformed("a persistent id that is not a torch storage");
        };
        if tag != "storage" {
            return malformed(format!("a persistent id of kind `{tag}`"));
        }
        Ok(Obj::Storage { dtype: *dtype, key: key.clone(), numel: self.int(*numel)? })
    }

    // --- the finished tree ---

    fn to_value(&self, id: Id, depth: usize, budget: &mut usize) -> Result<Value, PickleError> {
        if depth > MAX_DEPTH {
            return malformed("objects nested too deeply (or a reference cycle)");
        }
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| PickleError::Malformed("shared references expand to too many objects".into()))?;
        let list = |ids: &[Id], budget: &mut usize| -> Result<Vec<Value>, PickleError> {
            ids.iter().map(|&i| self.to_value(i, depth + 1, budget)).collect()
        };
        Ok(match &self.objs[id] {
            Obj::Value(v) => v.clone(),
            Obj::Tuple(ids) | Obj::List(ids) => Value::List(list(ids, budget)?),
            Obj::Dict(pairs) => Value::Dict(
                pairs
                    .iter()
                    .map(|&(k, v)| Ok((self.to_value(k, depth + 1, budget)?, self.to_value(v, depth + 1, budget)?)))
                    .collect::<Result<_, PickleError>>()?,
            ),
            // A ParameterDict reads as the dict of its parameters.
            Obj::Module { state } => match state {
                Some(s) => {
                    self.to_value(*s, depth + 1, budget)?.get("_parameters").cloned().unwrap_or(Value::Dict(Vec::new()))
                }
                None => Value::Dict(Vec::new()),
            },
            Obj::Global(g) => Value::Opaque(format!("{g:?}")),
            Obj::Storage { key, .. } => Value::Opaque(format!("storage {key}")),
        })
    }
}

/// Creating an instance of an allowlisted class (NEWOBJ, OBJ, INST, REDUCE on a class).
fn instantiate(g: &Global) -> Result<Obj, PickleError> {
    Ok(match g {
        Global::OrderedDict => Obj::Dict(Vec::new()),
        Global::Set | Global::Size => Obj::Tuple(Vec::new()),
        Global::ParameterDict => Obj::Module { state: None },
        Global::Inert(name) => Obj::Value(Value::Opaque(name.clone())),
        other => return malformed(format!("cannot create an object with {other:?}")),
    })
}

/// Refuses a tensor whose elements reach past its storage.
fn check_bounds(t: &TensorRef) -> Result<(), PickleError> {
    if t.shape.len() != t.stride.len() {
        return malformed("a tensor whose shape and stride differ in length");
    }
    if t.numel() == 0 {
        return Ok(());
    }
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|d| acc.checked_add(d)));
    match last {
        Some(last) if last < t.storage_numel => Ok(()),
        _ => malformed(format!("a tensor reaches past the end of its storage `{}`", t.storage)),
    }
}

fn pair(items: &[Id]) -> Result<(Id, Id), PickleError> {
    match items {
        [k, v] => Ok((*k, *v)),
        _ => malformed("expected a (key, value) pair"),
    }
}

fn pairs(items: Vec<Id>) -> Result<Vec<(Id, Id)>, PickleError> {
    if !items.len().is_multiple_of(2) {
        return malformed("an odd number of dict items");
    }
    Ok(items.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}

fn underflow() -> PickleError {
    PickleError::Malformed("the pickle pops more than it pushed".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unlisted_globals() {
        let p = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85R.";
        assert!(matches!(parse(p), Err(PickleError::Unsafe(g)) if g == "os.system"));
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        assert!(matches!(parse(p), Err(PickleError::Unsafe(g)) if g == "builtins.eval"));
    }

    #[test]
    fn builds_memoized_containers_after_filling() {
        // {'a': [1, -2]} with the list memoized before its items are appended, read back twice.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01J\xfe\xff\xff\xffeX\x01\x00\x00\x00bh\x01u.";
        let v = parse(p).unwrap();
        assert_eq!(v.get("a"), Some(&Value::List(vec![Value::Int(1), Value::Int(-2)])));
        assert_eq!(v.get("b"), v.get("a"));
    }

    #[test]
    fn refuses_cycles_and_truncation() {
        // l = []; l.append(l)
        assert!(matches!(parse(b"\x80\x02]q\x00h\x00a."), Err(PickleError::Malformed(_))));
        assert!(matches!(parse(b"\x80\x02X\x10\x00\x00\x00ab"), Err(PickleError::Malformed(_))));
    }

    #[test]
    fn contiguity() {
        let t = |shape: Vec<usize>, stride: Vec<usize>| TensorRef {
            storage: "0".into(),
            dtype: Dtype::F32,
            storage_numel: 100,
            offset: 0,
            shape,
            stride,
        };
        assert!(t(vec![2, 3], vec![3, 1]).is_contiguous());
        assert!(t(vec![2, 1, 3], vec![3, 7, 1]).is_contiguous());
        assert!(!t(vec![2, 3], vec![1, 2]).is_contiguous());
    }
}
