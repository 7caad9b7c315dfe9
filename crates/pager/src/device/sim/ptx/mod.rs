//! A PTX interpreter: parses the PTX NVRTC emits (`.version 8.x`, `.target sm_80`,
//! `.address_size 64`) into a compact IR and executes one kernel launch against a
//! [`GlobalMemory`], with sanitizer checks on every access.
//!
//! Entry points: [`Module::parse`] and [`launch`].
//!
//! # What is implemented
//! - Module: `.version`, `.target`, `.address_size 64`, `.visible/.extern/.weak` `.entry` and
//!   `.func` (declarations and definitions, `.param` lists and return parameters), performance
//!   directives (ignored), module-level `.global`/`.const` variables with initialisers (placed in
//!   a module window of the global address space) and `.shared` variables (laid out per kernel,
//!   only those the kernel can reach; `.extern .shared x[]` is dynamic shared memory).
//! - Bodies: `.reg` (incl. `%r<N>` ranges), scoped `{ }` blocks whose declarations shadow outer
//!   ones, `.local` depots (per thread and per call frame), `.param` call buffers, `.shared`,
//!   `.pragma` (ignored: hints only), labels, guards `@%p` / `@!%p`.
//! - Integer: `add sub mul(.lo/.hi/.wide) mad(.lo/.hi/.wide) div rem min max abs neg not and or
//!   xor shl shr bfi bfe clz popc brev`, carry chains `add.cc addc(.cc) sub.cc subc(.cc) mad.lo.cc
//!   mad.hi.cc madc.{lo,hi}(.cc)`, `add.sat.s32`.
//! - Float (f32, f64): `add sub mul fma` with `.rn/.rz/.rm/.rp` (f32: correctly rounded in every
//!   mode via exact f64 intermediates and TwoSum; f64: `.rn` only), `.ftz`, `.sat`; `div` (`.rn`,
//!   `.full`, `.approx`), `min max abs neg copysign`, `rcp sqrt rsqrt ex2 lg2 sin cos tanh`.
//! - `setp` (all integer and float comparisons incl. unordered `equ neu ltu leu gtu geu num nan`,
//!   `.and/.or/.xor` combining, `p|q` destinations), `selp`, predicate `and or xor not`.
//! - `mov` incl. vector pack/unpack and variable addresses; `cvt` int↔int (widen, narrow,
//!   `.sat`), float→int (`.rni/.rzi/.rmi/.rpi`, saturating, NaN → 0), int→float (all four
//!   roundings to f32/f64, `.rn` to f16/bf16), f64↔f32, f32→f32 round-to-integral and `.sat`,
//!   f32/f64→f16/bf16 `.rn` (ties to even), f16/bf16→f32/f64, `cvt.rn.{f16,bf16}x2.f32 d, a, b`
//!   (`a` in the upper half); `cvta` / `cvta.to` for global, shared and local.
//! - `ld`/`st` on param, global (incl. `.nc`), shared, local, const and generic addresses, `.v2`
//!   and `.v4`; `bar.sync 0`; `shfl.sync.{up,down,bfly,idx}.b32` (with `d|p`); `bra(.uni)`,
//!   `call(.uni)` with `.param` buffers, `ret`, `exit`.
//! - Special registers `%tid %ntid %ctaid %nctaid %laneid %warpid %nwarpid %globaltimer %clock
//!   %clock64 %smid %lanemask_*`.
//! - Warp-level matrix instructions: `ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16`
//!   and `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32`, with the ISA's
//!   fragment layouts; `cp.async.{cg,ca}.shared.global` (with src-size zero fill),
//!   `cp.async.commit_group`, `cp.async.wait_group N`, `cp.async.wait_all`.
//!
//! Anything else — other `mma` shapes, atomics, textures, f16 arithmetic, `bar.sync` with a
//! thread count — is recorded at parse time as an unimplemented instruction naming the opcode
//! and its line ([`Module::unsupported`]), and launching a kernel that can reach it is an error.
//!
//! # Choices where the ISA leaves results open
//! - Integer division by zero: quotient all ones (what NVIDIA hardware gives for unsigned; used
//!   for signed too), remainder = dividend. `MIN / -1` = `MIN`, `MIN % -1` = 0.
//! - `sub.cc`/`subc` treat CC.CF as a borrow: `subc d, a, b` is `a - (b + CF)`.
//! - f32 arithmetic returning NaN gives the canonical NaN `0x7fffffff`; f16/bf16 conversions of
//!   NaN give `0x7fff`. f64 NaN payloads are whatever the host produces.
//! - `min`/`max`: one NaN operand gives the other, two give the canonical NaN; −0 < +0.
//! - `.approx` functions (`rcp ex2 lg2 rsqrt sqrt sin cos tanh`, `div.approx/.full`) are computed in
//!   f64 and rounded to nearest f32: within 0.5 ulp of the exact value, tighter than the ISA's
//!   bounds, so results may differ from a GPU in the last bit.
//! - `bar.sync`: threads that have exited count as arrived (as on hardware).
//! - `shfl.sync` reading a lane outside the member mask is reported as an error (undefined in the
//!   ISA); a lane of the mask that has exited or does not exist is a deadlock.
//! - `mma.sync`: f16/bf16 products are exact in f64; the sum over k (in k order) plus C is
//!   accumulated in f64 and rounded once to f32. Hardware accumulates with limited internal
//!   precision, so results can differ from a GPU in the last bits.
//! - `cp.async` copies at issue (the ISA allows completion any time before the wait); its
//!   destination stays marked pending until the matching `wait_group`, so an early read is
//!   reported. A thread that exits with copies not waited for is reported too.
//! - `ldmatrix`/`mma.sync` are `.aligned`: all 32 lanes of the warp must reach the same
//!   instruction kind; a lane that exits first is a deadlock.
//! - `%globaltimer` is virtual: 10⁹ ns plus one per instruction executed so far in the launch.
//!
//! # Sanitizer
//! Every launch checks: global accesses inside a live allocation (via [`GlobalMemory`]) or a
//! module variable, shared and local accesses in bounds, natural alignment of every access
//! (vector accesses: the whole vector), shared-memory races (two threads touch the same byte
//! between two barriers, at least one writing; warp collectives do not order memory), reads of
//! shared memory never written in this CTA, reads of `cp.async` destinations before their wait,
//! deadlocks at barriers and collectives, and a per-launch instruction budget. Each finding is
//! one line naming kernel, block, thread, address and PTX line.

pub mod error;
pub mod exec;
pub mod ir;
pub mod lexer;
pub mod memory;
pub mod ops;
pub mod parse;
pub mod sanitize;

pub use error::{ErrorKind, PtxError, Result};
pub use exec::{check_kernel, launch, LaunchConfig, LaunchReport, Limits, ParamValue};
pub use ir::Module;
pub use memory::{GlobalMemory, VecMemory};

impl Module {
    /// Parses PTX source text.
    pub fn parse(src: &str) -> Result<Module> {
        parse::parse_module(src)
    }

    /// The unimplemented instructions of every function, as errors naming opcode and line.
    pub fn unsupported(&self) -> Vec<&PtxError> {
        self.functions.iter().flat_map(|f| &f.unsupported).collect()
    }

    /// The kernel or device function called `name` (its parameters give a launcher the
    /// expected argument sizes).
    pub fn function(&self, name: &str) -> Option<&ir::Function> {
        self.by_name
            .get(name)
            .and_then(|&i| self.functions.get(i as usize))
    }

    /// Names of the kernel entries.
    pub fn kernels(&self) -> Vec<&str> {
        self.functions
            .iter()
            .filter(|f| f.entry)
            .map(|f| f.name.as_str())
            .collect()
    }
}
