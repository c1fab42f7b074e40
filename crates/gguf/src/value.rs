//! GGUF metadata values, including nested arrays.

/// Value type ids as stored in GGUF.
pub(crate) mod tid {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A homogeneous array; arrays of arrays may mix element types between the inner arrays.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Value {
    pub(crate) fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => tid::U8,
            Value::I8(_) => tid::I8,
            Value::U16(_) => tid::U16,
            Value::I16(_) => tid::I16,
            Value::U32(_) => tid::U32,
            Value::I32(_) => tid::I32,
            Value::F32(_) => tid::F32,
            Value::Bool(_) => tid::BOOL,
            Value::String(_) => tid::STRING,
            Value::Array(_) => tid::ARRAY,
            Value::U64(_) => tid::U64,
            Value::I64(_) => tid::I64,
            Value::F64(_) => tid::F64,
        }
    }

    /// Any integer type that fits in u64 (negative values give `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Short rendering for `ternlm info`: long arrays are summarised.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.len() > 80 => {
                let cut: String = s.chars().take(77).collect();
                format!("{cut:?}... ({} bytes)", s.len())
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => a.summary(),
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_else(|| format!("{other:?}")),
        }
    }
}

macro_rules! array_dispatch {
    ($self:expr, $v:ident => $body:expr) => {
        match $self {
            Array::U8($v) => $body,
            Array::I8($v) => $body,
            Array::U16($v) => $body,
            Array::I16($v) => $body,
            Array::U32($v) => $body,
            Array::I32($v) => $body,
            Array::F32($v) => $body,
            Array::Bool($v) => $body,
            Array::String($v) => $body,
            Array::Array($v) => $body,
            Array::U64($v) => $body,
            Array::I64($v) => $body,
            Array::F64($v) => $body,
        }
    };
}

impl Array {
    pub fn len(&self) -> usize {
        array_dispatch!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn elem_type_id(&self) -> u32 {
        match self {
            Array::U8(_) => tid::U8,
            Array::I8(_) => tid::I8,
            Array::U16(_) => tid::U16,
            Array::I16(_) => tid::I16,
            Array::U32(_) => tid::U32,
            Array::I32(_) => tid::I32,
            Array::F32(_) => tid::F32,
            Array::Bool(_) => tid::BOOL,
            Array::String(_) => tid::STRING,
            Array::Array(_) => tid::ARRAY,
            Array::U64(_) => tid::U64,
            Array::I64(_) => tid::I64,
            Array::F64(_) => tid::F64,
        }
    }

    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    /// Numeric arrays of any element type as f32 (token scores are f32 in practice).
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        Some(match self {
            Array::F32(v) => v.clone(),
            Array::F64(v) => v.iter().map(|&x| x as f32).collect(),
            _ => self.to_i64_vec()?.into_iter().map(|x| x as f32).collect(),
        })
    }

    /// Integer arrays of any element type as i64.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U64(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I64(v) => v.clone(),
            _ => return None,
        })
    }

    fn summary(&self) -> String {
        let n = self.len();
        let kind = match self {
            Array::String(_) => "string",
            Array::Array(_) => "array",
            Array::F32(_) | Array::F64(_) => "float",
            Array::Bool(_) => "bool",
            _ => "int",
        };
        let head: Vec<String> = match self {
            Array::String(v) => v.iter().take(5).map(|s| format!("{s:?}")).collect(),
            Array::Array(v) => v.iter().take(3).map(|a| a.summary()).collect(),
            Array::F32(v) => v.iter().take(5).map(|x| x.to_string()).collect(),
            Array::F64(v) => v.iter().take(5).map(|x| x.to_string()).collect(),
            Array::Bool(v) => v.iter().take(5).map(|x| x.to_string()).collect(),
            _ => self.to_i64_vec().unwrap_or_default().iter().take(5).map(|x| x.to_string()).collect(),
        };
        let more = if n > head.len() { ", ..." } else { "" };
        format!("[{kind}; {n}] [{}{more}]", head.join(", "))
    }
}
