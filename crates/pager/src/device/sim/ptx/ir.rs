//! The compact form a parsed module takes: registers are indices, labels are instruction indices,
//! variables are resolved to offsets in their state space.

use std::collections::HashMap;

/// A PTX scalar type (`.b32`, `.f16x2`, `.pred`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Ty {
    B8,
    B16,
    B32,
    B64,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    F16,
    F16x2,
    Bf16,
    Bf16x2,
    F32,
    F64,
    Pred,
}

impl Ty {
    /// Parses a type suffix without its dot.
    pub fn from_name(s: &str) -> Option<Ty> {
        Some(match s {
            "b8" => Ty::B8,
            "b16" => Ty::B16,
            "b32" => Ty::B32,
            "b64" => Ty::B64,
            "u8" => Ty::U8,
            "u16" => Ty::U16,
            "u32" => Ty::U32,
            "u64" => Ty::U64,
            "s8" => Ty::S8,
            "s16" => Ty::S16,
            "s32" => Ty::S32,
            "s64" => Ty::S64,
            "f16" => Ty::F16,
            "f16x2" => Ty::F16x2,
            "bf16" => Ty::Bf16,
            "bf16x2" => Ty::Bf16x2,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "pred" => Ty::Pred,
            _ => return None,
        })
    }

    /// Size in bytes (a predicate counts as 1).
    pub fn size(self) -> u32 {
        match self {
            Ty::B8 | Ty::U8 | Ty::S8 | Ty::Pred => 1,
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::Bf16 => 2,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 | Ty::F16x2 | Ty::Bf16x2 => 4,
            Ty::B64 | Ty::U64 | Ty::S64 | Ty::F64 => 8,
        }
    }

    /// Size in bits.
    pub fn bits(self) -> u32 {
        self.size() * 8
    }

    /// Whether the type is a signed integer.
    pub fn signed(self) -> bool {
        matches!(self, Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64)
    }

    /// Whether the type is a floating-point type.
    pub fn float(self) -> bool {
        matches!(
            self,
            Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2 | Ty::F32 | Ty::F64
        )
    }
}

/// Rounding modifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Round {
    /// None given (the instruction's default).
    #[default]
    None,
    /// Nearest, ties to even (`.rn`, `.rni`).
    Rn,
    /// Toward zero (`.rz`, `.rzi`).
    Rz,
    /// Toward −∞ (`.rm`, `.rmi`).
    Rm,
    /// Toward +∞ (`.rp`, `.rpi`).
    Rp,
}

/// Comparison operator of `setp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Lo,
    Ls,
    Hi,
    Hs,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

/// Boolean combining operator (`setp.*.and`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum BoolOp {
    And,
    Or,
    Xor,
}

/// State space of a memory access or address conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Space {
    Generic,
    Global,
    Shared,
    Local,
    Param,
    Const,
}

/// Width/half selector of integer `mul`/`mad`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub enum MulMode {
    #[default]
    Lo,
    Hi,
    Wide,
}

/// Shuffle mode of `shfl.sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

/// A special (read-only) register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Special {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    LaneId,
    WarpId,
    NWarpId,
    GlobalTimer,
    Clock,
    Clock64,
    SmId,
    LaneMaskEq,
    LaneMaskLt,
    LaneMaskLe,
    LaneMaskGt,
    LaneMaskGe,
}

/// A variable resolved to its state space and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symbol {
    /// A shared variable (index into [`Module::shared`]); its offset depends on the kernel.
    Shared(u32),
    /// Address in the module-globals window of global memory.
    Global(u64),
    /// Offset in the current frame's local depot.
    Local(u32),
    /// Offset in the current frame's parameter area.
    Param(u32),
}

/// Base of an address expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrBase {
    /// A register.
    Reg(u32),
    /// A variable.
    Sym(Symbol),
    /// An absolute address (`[0x100]`).
    Abs,
}

/// One instruction operand.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A register index.
    Reg(u32),
    /// Negated predicate `!%p`.
    NotPred(u32),
    /// Integer literal bits (negative literals in two's complement).
    Imm(u64),
    /// Float literal bits; `double` says f64 bits, else f32 bits.
    FImm {
        /// The bits.
        bits: u64,
        /// Whether the bits are an f64.
        double: bool,
    },
    /// Special register.
    Special(Special),
    /// Vector `{a, b, ...}`; `None` elements are `_` sinks.
    Vec(Vec<Option<Operand>>),
    /// Address `[base+offset]`.
    Addr(AddrBase, i64),
    /// A variable's address as a value.
    Sym(Symbol),
    /// A branch target (instruction index).
    Label(u32),
    /// Two destinations `a|b` (setp, shfl).
    Pair(u32, Option<u32>),
    /// A callee (function index).
    Func(u32),
    /// A `.param` argument list of a call (offsets and sizes in the caller's parameter area).
    Params(Vec<(u32, u32)>),
}

/// Instruction family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Mad,
    Fma,
    Div,
    Rem,
    Min,
    Max,
    Abs,
    Neg,
    Not,
    And,
    Or,
    Xor,
    Shl,
    Shr,
    Addc,
    Subc,
    Madc,
    Bfi,
    Bfe,
    Clz,
    Popc,
    Brev,
    Setp,
    Selp,
    Mov,
    Cvt,
    Cvta,
    Ld,
    St,
    Bar,
    Shfl,
    Bra,
    Call,
    Ret,
    Exit,
    Rcp,
    Sqrt,
    Rsqrt,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Tanh,
    Copysign,
    Ldmatrix,
    Mma,
    CpAsync,
    CpCommit,
    CpWait,
}

/// Modifiers of one instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mods {
    /// Rounding mode.
    pub round: Round,
    /// `.ftz`.
    pub ftz: bool,
    /// `.sat`.
    pub sat: bool,
    /// `.approx` (or `.full`).
    pub approx: bool,
    /// `.cc`: writes the carry flag.
    pub cc: bool,
    /// `.lo/.hi/.wide` for integer mul/mad.
    pub mul: MulMode,
    /// Comparison of `setp`.
    pub cmp: Option<Cmp>,
    /// Combining op of `setp`.
    pub bool_op: Option<BoolOp>,
    /// State space of ld/st/cvta.
    pub space: Option<Space>,
    /// `cvta.to`: generic → space (else space → generic).
    pub to: bool,
    /// Vector width of ld/st (1, 2 or 4).
    pub vec: u8,
    /// Shuffle mode.
    pub shfl: Option<ShflMode>,
    /// `ldmatrix.trans`.
    pub trans: bool,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq)]
pub struct Inst {
    /// Family.
    pub op: Op,
    /// Primary (destination) type.
    pub ty: Ty,
    /// Secondary (source) type: `cvt`'s source, `setp`'s operands equal `ty`.
    pub ty2: Ty,
    /// Modifiers.
    pub m: Mods,
    /// Guard predicate register and whether it is negated.
    pub guard: Option<(u32, bool)>,
    /// Destinations.
    pub d: Vec<Operand>,
    /// Sources.
    pub s: Vec<Operand>,
    /// Source line.
    pub line: u32,
}

/// A declared `.param` of a function or kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamDecl {
    /// Its name.
    pub name: String,
    /// Offset in the frame's parameter area.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
}

/// A kernel (`.entry`) or device function (`.func`).
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    /// Its name.
    pub name: String,
    /// Whether it is a kernel entry.
    pub entry: bool,
    /// Parameters, in order.
    pub params: Vec<ParamDecl>,
    /// Return parameters (`.func` only).
    pub rets: Vec<ParamDecl>,
    /// Size of the frame's parameter area (params, returns and call buffers).
    pub param_size: u32,
    /// Size of the frame's local depot.
    pub local_size: u32,
    /// Alignment of the local depot.
    pub local_align: u32,
    /// Number of registers (all scopes).
    pub nregs: u32,
    /// Body; `None` for a declaration only.
    pub body: Option<Vec<Inst>>,
    /// Instructions in the body the interpreter does not implement (launching it is an error).
    pub unsupported: Vec<super::error::PtxError>,
    /// Shared variables the body names directly.
    pub shared_used: Vec<u32>,
    /// Functions the body calls.
    pub calls: Vec<u32>,
    /// Line of its header.
    pub line: u32,
}

/// A parsed PTX module.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    /// Functions and kernels.
    pub functions: Vec<Function>,
    /// Name → index into `functions`.
    pub by_name: HashMap<String, u32>,
    /// The module's `.shared` variables.
    pub shared: Vec<SharedVar>,
    /// Initial contents of the module-level `.global` variables, at [`GLOBALS_BASE`].
    pub globals: Vec<u8>,
}

/// Where module-level `.global` variables live in the global address space: a window of
/// [`WINDOW_SIZE`] bytes below the simulated device's allocations (from `0x7f00_0000_0000`), so
/// that it never shadows device memory.
pub const GLOBALS_BASE: u64 = 0x0000_7c00_0000_0000;
/// Base of the shared window in the generic address space.
pub const SHARED_WINDOW: u64 = 0x0000_7e00_0000_0000;
/// Base of the local window in the generic address space.
pub const LOCAL_WINDOW: u64 = 0x0000_7d00_0000_0000;
/// Size of each window.
pub const WINDOW_SIZE: u64 = 1 << 32;

/// A `.shared` variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedVar {
    /// Its name.
    pub name: String,
    /// Size in bytes (0 for `.extern` dynamic shared memory).
    pub size: u32,
    /// Alignment.
    pub align: u32,
    /// Whether it is `.extern` (dynamic shared memory).
    pub dynamic: bool,
}
