//! Executes one kernel launch: CTAs one after another, threads with Volta-style independent
//! scheduling (each runs until a `bar.sync`, a warp collective or its exit), collectives once
//! every lane of their member mask has arrived.

use super::error::{ErrorKind, PtxError, Result};
use super::ir::*;
use super::memory::GlobalMemory;
use super::ops::{cvt, float, int};
use super::sanitize;

mod mem;
mod warp;

use mem::{access, address, exec_cp_async, exec_ld, exec_st};
use warp::fire_shfl;
pub use warp::shfl_src;

/// Grid and block shape of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Bytes of dynamic shared memory.
    pub dynamic_shared: u32,
}

/// One kernel argument.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// A 32-bit unsigned value.
    U32(u32),
    /// A 32-bit signed value.
    I32(i32),
    /// A 64-bit unsigned value.
    U64(u64),
    /// A 64-bit signed value.
    I64(i64),
    /// An f32.
    F32(f32),
    /// An f64.
    F64(f64),
    /// A device pointer.
    Ptr(u64),
    /// Raw bytes (structs passed by value).
    Bytes(Vec<u8>),
}

impl ParamValue {
    fn bytes(&self) -> Vec<u8> {
        match self {
            ParamValue::U32(v) => v.to_le_bytes().to_vec(),
            ParamValue::I32(v) => v.to_le_bytes().to_vec(),
            ParamValue::U64(v) | ParamValue::Ptr(v) => v.to_le_bytes().to_vec(),
            ParamValue::I64(v) => v.to_le_bytes().to_vec(),
            ParamValue::F32(v) => v.to_le_bytes().to_vec(),
            ParamValue::F64(v) => v.to_le_bytes().to_vec(),
            ParamValue::Bytes(b) => b.clone(),
        }
    }
}

/// Per-launch resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Instructions (all threads, predicated-off ones included) before the launch is stopped.
    pub instruction_budget: u64,
    /// Largest per-thread local memory (frames of nested calls together).
    pub local_bytes_per_thread: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            instruction_budget: 2_000_000_000,
            local_bytes_per_thread: 512 * 1024,
        }
    }
}

/// What a completed launch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LaunchReport {
    /// Instructions executed, all threads together.
    pub instructions: u64,
    /// Blocks run.
    pub blocks: u64,
    /// Threads per block.
    pub threads_per_block: u32,
    /// Shared memory per block (static + dynamic).
    pub shared_bytes: u32,
}

/// Largest static shared memory per block.
pub const MAX_STATIC_SHARED: u32 = 48 * 1024;
/// Largest shared memory per block with opt-in (sm_80).
pub const MAX_SHARED: u32 = 163 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Ready,
    Bar,
    Shfl,
    Exited,
}

struct Frame {
    func: u32,
    pc: u32,
    regs: Vec<u64>,
    params: Vec<u8>,
    local_base: u32,
    rets: Vec<(u32, u32)>,
}

struct Thread {
    frames: Vec<Frame>,
    st: St,
    cf: bool,
    tid: [u32; 3],
    linear: u32,
    local: Vec<u8>,
    wait_line: u32,
    /// `cp.async` copies not yet waited for: (group, shared offset, bytes); group `u32::MAX`
    /// while uncommitted.
    pending: Vec<(u32, u32, u32)>,
    next_group: u32,
}

struct Ctx<'a> {
    m: &'a Module,
    kernel: &'a str,
    cfg: LaunchConfig,
    ctaid: [u32; 3],
    shared: Vec<u8>,
    shared_init: Vec<bool>,
    shared_pending: Vec<bool>,
    races: sanitize::SharedRaces,
    shared_offsets: &'a [u32],
    globals: &'a mut Vec<u8>,
    mem: &'a mut dyn GlobalMemory,
    executed: u64,
    budget: u64,
    local_limit: u32,
}

fn dims(v: [u32; 3]) -> String {
    format!("({},{},{})", v[0], v[1], v[2])
}

impl Ctx<'_> {
    fn err(
        &self,
        kind: ErrorKind,
        t: &Thread,
        line: u32,
        what: impl std::fmt::Display,
    ) -> PtxError {
        PtxError::new(
            kind,
            format!(
                "kernel {}, block {}, thread {}: {what} (PTX line {line})",
                self.kernel,
                dims(self.ctaid),
                dims(t.tid)
            ),
        )
    }
}

/// Checks that `kernel` is a kernel entry of `module` whose reachable functions are all defined
/// and implemented (what [`launch`] refuses before running); returns its function index.
pub fn check_kernel(module: &Module, kernel: &str) -> Result<u32> {
    let fidx = *module
        .by_name
        .get(kernel)
        .ok_or_else(|| PtxError::launch(format!("no kernel `{kernel}` in the module")))?;
    let f = &module.functions[fidx as usize];
    if !f.entry {
        return Err(PtxError::launch(format!(
            "`{kernel}` is a .func, not a kernel entry"
        )));
    }
    // Every function the kernel can reach must be defined and fully implemented.
    for g in reachable(module, fidx) {
        let g = &module.functions[g as usize];
        if g.body.is_none() {
            return Err(PtxError::launch(format!(
                "kernel `{kernel}` calls `{}`, which has no body",
                g.name
            )));
        }
        if let Some(e) = g.unsupported.first() {
            return Err(PtxError::new(
                ErrorKind::Unimplemented,
                format!("kernel `{kernel}`: {e}"),
            ));
        }
    }
    Ok(fidx)
}

/// The functions `fidx` can reach (itself first).
fn reachable(module: &Module, fidx: u32) -> Vec<u32> {
    let mut reach = vec![fidx];
    let mut i = 0;
    while i < reach.len() {
        for &c in &module.functions[reach[i] as usize].calls {
            if !reach.contains(&c) {
                reach.push(c);
            }
        }
        i += 1;
    }
    reach
}

/// Runs `kernel` of `module` over the whole grid against `mem`.
pub fn launch(
    module: &Module,
    kernel: &str,
    cfg: LaunchConfig,
    params: &[ParamValue],
    mem: &mut dyn GlobalMemory,
    limits: Limits,
) -> Result<LaunchReport> {
    let fidx = check_kernel(module, kernel)?;
    let f = &module.functions[fidx as usize];
    let reach = reachable(module, fidx);
    // Parameters.
    if params.len() != f.params.len() {
        return Err(PtxError::launch(format!(
            "kernel `{kernel}` takes {} parameters, {} given",
            f.params.len(),
            params.len()
        )));
    }
    let mut pbuf = vec![0u8; f.param_size as usize];
    for (k, (decl, v)) in f.params.iter().zip(params).enumerate() {
        let b = v.bytes();
        if b.len() != decl.size as usize {
            return Err(PtxError::launch(format!(
                "kernel `{kernel}` parameter {k} (`{}`) is {} bytes, {} given",
                decl.name,
                decl.size,
                b.len()
            )));
        }
        pbuf[decl.offset as usize..(decl.offset + decl.size) as usize].copy_from_slice(&b);
    }
    // Hardware limits (sm_80).
    let [bx, by, bz] = cfg.block;
    let threads = bx as u64 * by as u64 * bz as u64;
    if threads == 0 || threads > 1024 || bx > 1024 || by > 1024 || bz > 64 {
        return Err(PtxError::launch(format!(
            "kernel `{kernel}`: block {} exceeds the limits (1..=1024 threads, x,y ≤ 1024, z ≤ 64)",
            dims(cfg.block)
        )));
    }
    let [gx, gy, gz] = cfg.grid;
    if gx == 0 || gy == 0 || gz == 0 || gx > i32::MAX as u32 || gy > 65535 || gz > 65535 {
        return Err(PtxError::launch(format!(
            "kernel `{kernel}`: grid {} exceeds the limits (x ≤ 2^31-1, y,z ≤ 65535, none 0)",
            dims(cfg.grid)
        )));
    }
    // Shared layout of the variables reachable from this kernel.
    let mut offsets = vec![u32::MAX; module.shared.len()];
    let mut size = 0u32;
    let mut dynamic = Vec::new();
    for &g in &reach {
        for &v in &module.functions[g as usize].shared_used {
            let var = &module.shared[v as usize];
            if offsets[v as usize] != u32::MAX {
                continue;
            }
            if var.dynamic {
                dynamic.push(v);
                continue;
            }
            let off = size.div_ceil(var.align.max(1)) * var.align.max(1);
            offsets[v as usize] = off;
            size = off + var.size;
        }
    }
    if size > MAX_STATIC_SHARED {
        return Err(PtxError::launch(format!(
            "kernel `{kernel}`: {size} bytes of static shared memory exceed 48 KiB"
        )));
    }
    let dyn_off = size.div_ceil(16) * 16;
    for v in dynamic {
        offsets[v as usize] = dyn_off;
    }
    let total_shared = dyn_off + cfg.dynamic_shared;
    if total_shared > MAX_SHARED {
        return Err(PtxError::launch(format!(
            "kernel `{kernel}`: {total_shared} bytes of shared memory exceed {MAX_SHARED}"
        )));
    }
    let mut globals = module.globals.clone();
    let mut ctx = Ctx {
        m: module,
        kernel,
        cfg,
        ctaid: [0; 3],
        shared: Vec::new(),
        shared_init: Vec::new(),
        shared_pending: Vec::new(),
        races: sanitize::SharedRaces::default(),
        shared_offsets: &offsets,
        globals: &mut globals,
        mem,
        executed: 0,
        budget: limits.instruction_budget,
        local_limit: limits.local_bytes_per_thread,
    };
    let mut blocks = 0;
    for z in 0..gz {
        for y in 0..gy {
            for x in 0..gx {
                ctx.ctaid = [x, y, z];
                ctx.shared = vec![0; total_shared as usize];
                ctx.shared_init = vec![false; total_shared as usize];
                ctx.shared_pending = vec![false; total_shared as usize];
                ctx.races = sanitize::SharedRaces::new(total_shared as usize);
                run_block(&mut ctx, fidx, &pbuf)?;
                blocks += 1;
            }
        }
    }
    Ok(LaunchReport {
        instructions: ctx.executed,
        blocks,
        threads_per_block: threads as u32,
        shared_bytes: total_shared,
    })
}

fn new_frame(
    ctx: &Ctx,
    t: &mut Thread,
    func: u32,
    params: Vec<u8>,
    rets: Vec<(u32, u32)>,
) -> Result<Frame> {
    let f = &ctx.m.functions[func as usize];
    let align = f.local_align.max(16) as usize;
    let base = t.local.len().div_ceil(align) * align;
    let end = base + f.local_size as usize;
    if end > ctx.local_limit as usize {
        return Err(ctx.err(
            ErrorKind::Memory,
            t,
            f.line,
            format!(
                "local memory of {end} bytes exceeds the per-thread limit (call depth {})",
                t.frames.len()
            ),
        ));
    }
    t.local.resize(end, 0);
    Ok(Frame {
        func,
        pc: 0,
        regs: vec![0; f.nregs as usize],
        params,
        local_base: base as u32,
        rets,
    })
}

fn run_block(ctx: &mut Ctx, fidx: u32, pbuf: &[u8]) -> Result<()> {
    let [bx, by, bz] = ctx.cfg.block;
    let mut threads = Vec::with_capacity((bx * by * bz) as usize);
    for z in 0..bz {
        for y in 0..by {
            for x in 0..bx {
                let mut t = Thread {
                    frames: Vec::new(),
                    st: St::Ready,
                    cf: false,
                    tid: [x, y, z],
                    linear: x + bx * (y + by * z),
                    local: Vec::new(),
                    wait_line: 0,
                    pending: Vec::new(),
                    next_group: 0,
                };
                let fr = new_frame(ctx, &mut t, fidx, pbuf.to_vec(), Vec::new())?;
                t.frames.push(fr);
                threads.push(t);
            }
        }
    }
    loop {
        let mut progressed = false;
        for t in threads.iter_mut() {
            if t.st == St::Ready {
                run_thread(ctx, t)?;
                progressed = true;
            }
        }
        let nwarps = threads.len().div_ceil(32);
        for w in 0..nwarps {
            if fire_shfl(ctx, &mut threads, w)? {
                progressed = true;
            }
        }
        if progressed {
            continue;
        }
        if threads.iter().all(|t| t.st == St::Exited) {
            return Ok(());
        }
        // Threads that exited count as arrived at a barrier, as on hardware.
        if threads.iter().all(|t| matches!(t.st, St::Bar | St::Exited)) {
            for t in threads.iter_mut() {
                if t.st == St::Bar {
                    t.st = St::Ready;
                }
            }
            ctx.races.barrier();
            continue;
        }
        // Nothing can move: a deadlock.
        let w = threads
            .iter()
            .find(|t| t.st == St::Shfl)
            .or_else(|| threads.iter().find(|t| t.st == St::Bar));
        let Some(w) = w else {
            return Err(PtxError::new(
                ErrorKind::Deadlock,
                format!("kernel {}: scheduler stuck", ctx.kernel),
            ));
        };
        let other = threads
            .iter()
            .find(|t| t.st != St::Exited && t.st != w.st)
            .map(|t| format!(", thread {} waits at PTX line {}", dims(t.tid), t.wait_line))
            .unwrap_or_default();
        let what = match (w.st, cur_inst(ctx, w)?.op) {
            (St::Bar, _) => "bar.sync",
            (_, Op::Ldmatrix) => "ldmatrix",
            (_, Op::Mma) => "mma.sync",
            _ => "shfl.sync",
        };
        return Err(PtxError::new(
            ErrorKind::Deadlock,
            format!(
                "deadlock in kernel {}, block {}, warp {}: thread {} waits at {what} (PTX line {}){other}",
                ctx.kernel,
                dims(ctx.ctaid),
                w.linear / 32,
                dims(w.tid),
                w.wait_line
            ),
        ));
    }
}

fn cur_inst<'m>(ctx: &Ctx<'m>, t: &Thread) -> Result<&'m Inst> {
    let fr = t
        .frames
        .last()
        .ok_or_else(|| PtxError::launch("no frame"))?;
    ctx.m.functions[fr.func as usize]
        .body
        .as_ref()
        .and_then(|b| b.get(fr.pc as usize))
        .ok_or_else(|| PtxError::launch("pc out of range"))
}

fn special(ctx: &Ctx, t: &Thread, s: Special) -> u64 {
    let nthreads = ctx.cfg.block.iter().product::<u32>();
    let lane = t.linear % 32;
    match s {
        Special::Tid(d) => t.tid[d as usize] as u64,
        Special::Ntid(d) => ctx.cfg.block[d as usize] as u64,
        Special::Ctaid(d) => ctx.ctaid[d as usize] as u64,
        Special::Nctaid(d) => ctx.cfg.grid[d as usize] as u64,
        Special::LaneId => lane as u64,
        Special::WarpId => (t.linear / 32) as u64,
        Special::NWarpId => nthreads.div_ceil(32) as u64,
        // Virtual nanoseconds: one per instruction executed so far in the launch.
        Special::GlobalTimer => 1_000_000_000 + ctx.executed,
        Special::Clock | Special::Clock64 => ctx.executed,
        Special::SmId => 0,
        Special::LaneMaskEq => 1u64 << lane,
        Special::LaneMaskLt => (1u64 << lane) - 1,
        Special::LaneMaskLe => (1u64 << (lane + 1)) - 1,
        Special::LaneMaskGt => 0xffff_ffff & !((1u64 << (lane + 1)) - 1),
        Special::LaneMaskGe => 0xffff_ffff & !((1u64 << lane) - 1),
    }
}

fn sym_addr(ctx: &Ctx, fr: &Frame, s: Symbol, line: u32) -> Result<u64> {
    Ok(match s {
        Symbol::Shared(id) => {
            let off = ctx
                .shared_offsets
                .get(id as usize)
                .copied()
                .unwrap_or(u32::MAX);
            if off == u32::MAX {
                return Err(PtxError::parse(
                    line,
                    "shared variable outside the kernel's layout",
                ));
            }
            off as u64
        }
        Symbol::Global(a) => a,
        Symbol::Local(off) => (fr.local_base + off) as u64,
        Symbol::Param(off) => off as u64,
    })
}

fn imm_as(v: u64, ty: Ty) -> u64 {
    match ty {
        Ty::F32 => ((v as i64) as f32).to_bits() as u64,
        Ty::F64 => ((v as i64) as f64).to_bits(),
        _ => v & int::mask(ty.bits()),
    }
}

fn read(ctx: &Ctx, t: &Thread, op: &Operand, ty: Ty, line: u32) -> Result<u64> {
    let fr = t
        .frames
        .last()
        .ok_or_else(|| PtxError::launch("no frame"))?;
    let m = int::mask(ty.bits());
    Ok(match op {
        Operand::Reg(r) => {
            if ty == Ty::Pred {
                fr.regs[*r as usize] & 1
            } else {
                fr.regs[*r as usize] & m
            }
        }
        Operand::NotPred(r) => (fr.regs[*r as usize] & 1) ^ 1,
        Operand::Imm(v) => imm_as(*v, ty),
        Operand::FImm { bits, double } => match (ty, double) {
            (Ty::F32, true) => (f64::from_bits(*bits) as f32).to_bits() as u64,
            (Ty::F64, false) => (f32::from_bits(*bits as u32) as f64).to_bits(),
            _ => *bits & m,
        },
        Operand::Special(s) => special(ctx, t, *s) & m,
        Operand::Sym(s) => sym_addr(ctx, fr, *s, line)? & m,
        _ => {
            return Err(PtxError::parse(
                line,
                format!("operand {op:?} cannot be read as a value"),
            ))
        }
    })
}

fn write(t: &mut Thread, op: &Operand, v: u64, ty: Ty, line: u32) -> Result<()> {
    let fr = t
        .frames
        .last_mut()
        .ok_or_else(|| PtxError::launch("no frame"))?;
    match op {
        Operand::Reg(r) => {
            fr.regs[*r as usize] = if ty == Ty::Pred {
                v & 1
            } else {
                v & int::mask(ty.bits())
            };
            Ok(())
        }
        _ => Err(PtxError::parse(
            line,
            format!("operand {op:?} cannot be written"),
        )),
    }
}

fn f32v(v: u64) -> f32 {
    f32::from_bits(v as u32)
}

fn f64v(v: u64) -> f64 {
    f64::from_bits(v)
}

fn b32(x: f32) -> u64 {
    x.to_bits() as u64
}

fn compare(cmp: Cmp, ty: Ty, a: u64, b: u64, ftz: bool) -> bool {
    if ty.float() {
        let (x, y) = if ty == Ty::F32 {
            let f = |v| {
                let x = f32v(v);
                (if ftz { float::ftz(x) } else { x }) as f64
            };
            (f(a), f(b))
        } else {
            (f64v(a), f64v(b))
        };
        let nan = x.is_nan() || y.is_nan();
        return match cmp {
            Cmp::Eq => !nan && x == y,
            Cmp::Ne => !nan && x != y,
            Cmp::Lt => !nan && x < y,
            Cmp::Le => !nan && x <= y,
            Cmp::Gt => !nan && x > y,
            Cmp::Ge => !nan && x >= y,
            Cmp::Equ => nan || x == y,
            Cmp::Neu => nan || x != y,
            Cmp::Ltu => nan || x < y,
            Cmp::Leu => nan || x <= y,
            Cmp::Gtu => nan || x > y,
            Cmp::Geu => nan || x >= y,
            Cmp::Num => !nan,
            Cmp::Nan => nan,
            Cmp::Lo | Cmp::Ls | Cmp::Hi | Cmp::Hs => false,
        };
    }
    let bits = ty.bits();
    let (sa, sb) = (int::sext(a, bits), int::sext(b, bits));
    let (ua, ub) = (a & int::mask(bits), b & int::mask(bits));
    let signed = ty.signed();
    match cmp {
        Cmp::Eq => ua == ub,
        Cmp::Ne => ua != ub,
        Cmp::Lt => {
            if signed {
                sa < sb
            } else {
                ua < ub
            }
        }
        Cmp::Le => {
            if signed {
                sa <= sb
            } else {
                ua <= ub
            }
        }
        Cmp::Gt => {
            if signed {
                sa > sb
            } else {
                ua > ub
            }
        }
        Cmp::Ge => {
            if signed {
                sa >= sb
            } else {
                ua >= ub
            }
        }
        Cmp::Lo => ua < ub,
        Cmp::Ls => ua <= ub,
        Cmp::Hi => ua > ub,
        Cmp::Hs => ua >= ub,
        _ => false,
    }
}

fn wide(ty: Ty) -> Ty {
    match ty {
        Ty::U16 => Ty::U32,
        Ty::S16 => Ty::S32,
        Ty::U32 => Ty::U64,
        Ty::S32 => Ty::S64,
        t => t,
    }
}

/// Runs thread `t` until it blocks or exits.
fn run_thread(ctx: &mut Ctx, t: &mut Thread) -> Result<()> {
    loop {
        let inst = cur_inst(ctx, t)?;
        if ctx.executed >= ctx.budget {
            return Err(ctx.err(
                ErrorKind::Budget,
                t,
                inst.line,
                format!("instruction budget of {} exhausted", ctx.budget),
            ));
        }
        ctx.executed += 1;
        if let Some((p, neg)) = inst.guard {
            let fr = t
                .frames
                .last()
                .ok_or_else(|| PtxError::launch("no frame"))?;
            if ((fr.regs[p as usize] & 1) == 1) == neg {
                if let Some(fr) = t.frames.last_mut() {
                    fr.pc += 1;
                }
                continue;
            }
        }
        match exec(ctx, t, inst)? {
            Flow::Next => {
                if let Some(fr) = t.frames.last_mut() {
                    fr.pc += 1;
                }
            }
            Flow::Jumped => {}
            Flow::Block => return Ok(()),
        }
    }
}

enum Flow {
    Next,
    Jumped,
    Block,
}

fn exec(ctx: &mut Ctx, t: &mut Thread, inst: &Inst) -> Result<Flow> {
    let ty = inst.ty;
    let m = &inst.m;
    let line = inst.line;
    let bits = ty.bits();
    let signed = ty.signed();
    let r = |ctx: &Ctx, t: &Thread, i: usize| read(ctx, t, &inst.s[i], ty, line);
    let v: u64 = match inst.op {
        Op::Add | Op::Sub if ty == Ty::F32 => {
            let (a, b) = (f32v(r(ctx, t, 0)?), f32v(r(ctx, t, 1)?));
            let f = if inst.op == Op::Add {
                float::add32
            } else {
                float::sub32
            };
            b32(f(a, b, m.round, m.ftz, m.sat))
        }
        Op::Add | Op::Sub if ty == Ty::F64 => {
            let (a, b) = (f64v(r(ctx, t, 0)?), f64v(r(ctx, t, 1)?));
            (if inst.op == Op::Add { a + b } else { a - b }).to_bits()
        }
        Op::Add | Op::Sub => {
            let (a, b) = (r(ctx, t, 0)?, r(ctx, t, 1)?);
            if m.sat {
                let (x, y) = (int::sext(a, 32), int::sext(b, 32));
                let s = if inst.op == Op::Add { x + y } else { x - y };
                (s.clamp(i32::MIN as i64, i32::MAX as i64) as u64) & int::mask(32)
            } else if inst.op == Op::Add {
                let (s, c) = int::add_carry(a, b, false, bits);
                if m.cc {
                    t.cf = c;
                }
                s
            } else {
                let (s, c) = int::sub_borrow(a, b, false, bits);
                if m.cc {
                    t.cf = c;
                }
                s
            }
        }
        Op::Addc | Op::Subc => {
            let (a, b) = (r(ctx, t, 0)?, r(ctx, t, 1)?);
            let (s, c) = if inst.op == Op::Addc {
                int::add_carry(a, b, t.cf, bits)
            } else {
                int::sub_borrow(a, b, t.cf, bits)
            };
            if m.cc {
                t.cf = c;
            }
            s
        }
        Op::Mul if ty == Ty::F32 => b32(float::mul32(
            f32v(r(ctx, t, 0)?),
            f32v(r(ctx, t, 1)?),
            m.round,
            m.ftz,
            m.sat,
        )),
        Op::Mul if ty == Ty::F64 => (f64v(r(ctx, t, 0)?) * f64v(r(ctx, t, 1)?)).to_bits(),
        Op::Mul | Op::Mad | Op::Madc => {
            let full = int::full_mul(r(ctx, t, 0)?, r(ctx, t, 1)?, bits, signed);
            let part = match m.mul {
                MulMode::Lo => (full as u64) & int::mask(bits),
                MulMode::Hi => ((full >> bits) as u64) & int::mask(bits),
                MulMode::Wide => (full as u64) & int::mask(2 * bits),
            };
            if inst.op == Op::Mul {
                let dty = if m.mul == MulMode::Wide { wide(ty) } else { ty };
                write(t, &inst.d[0], part, dty, line)?;
                return Ok(Flow::Next);
            }
            let w = if m.mul == MulMode::Wide {
                2 * bits
            } else {
                bits
            };
            let cty = if m.mul == MulMode::Wide { wide(ty) } else { ty };
            let c = read(ctx, t, &inst.s[2], cty, line)?;
            let cin = inst.op == Op::Madc && t.cf;
            let (s, co) = int::add_carry(part, c, cin, w);
            if m.cc {
                t.cf = co;
            }
            write(t, &inst.d[0], s, cty, line)?;
            return Ok(Flow::Next);
        }
        Op::Fma if ty == Ty::F32 => b32(float::fma32(
            f32v(r(ctx, t, 0)?),
            f32v(r(ctx, t, 1)?),
            f32v(r(ctx, t, 2)?),
            m.round,
            m.ftz,
            m.sat,
        )),
        Op::Fma => f64v(r(ctx, t, 0)?)
            .mul_add(f64v(r(ctx, t, 1)?), f64v(r(ctx, t, 2)?))
            .to_bits(),
        Op::Div if ty == Ty::F32 => b32(float::div32(
            f32v(r(ctx, t, 0)?),
            f32v(r(ctx, t, 1)?),
            m.ftz,
        )),
        Op::Div if ty == Ty::F64 => (f64v(r(ctx, t, 0)?) / f64v(r(ctx, t, 1)?)).to_bits(),
        Op::Div => int::div(r(ctx, t, 0)?, r(ctx, t, 1)?, bits, signed),
        Op::Rem => int::rem(r(ctx, t, 0)?, r(ctx, t, 1)?, bits, signed),
        Op::Min | Op::Max => {
            let (a, b) = (r(ctx, t, 0)?, r(ctx, t, 1)?);
            let max = inst.op == Op::Max;
            match ty {
                Ty::F32 => b32(if max {
                    float::max32(f32v(a), f32v(b), m.ftz)
                } else {
                    float::min32(f32v(a), f32v(b), m.ftz)
                }),
                Ty::F64 => float::minmax64(f64v(a), f64v(b), max).to_bits(),
                _ => int::minmax(a, b, bits, signed, max),
            }
        }
        Op::Abs | Op::Neg => {
            let a = r(ctx, t, 0)?;
            let neg = inst.op == Op::Neg;
            match ty {
                Ty::F32 => {
                    let x = if m.ftz { float::ftz(f32v(a)) } else { f32v(a) };
                    b32(if neg { -x } else { x.abs() })
                }
                Ty::F64 => {
                    if neg {
                        a ^ (1 << 63)
                    } else {
                        a & !(1 << 63)
                    }
                }
                _ => {
                    let x = int::sext(a, bits);
                    (if neg || x < 0 { x.wrapping_neg() } else { x }) as u64 & int::mask(bits)
                }
            }
        }
        Op::Not => {
            let a = r(ctx, t, 0)?;
            if ty == Ty::Pred {
                a ^ 1
            } else {
                !a & int::mask(bits)
            }
        }
        Op::And => r(ctx, t, 0)? & r(ctx, t, 1)?,
        Op::Or => r(ctx, t, 0)? | r(ctx, t, 1)?,
        Op::Xor => r(ctx, t, 0)? ^ r(ctx, t, 1)?,
        Op::Shl | Op::Shr => {
            let a = r(ctx, t, 0)?;
            let n = read(ctx, t, &inst.s[1], Ty::U32, line)?;
            if inst.op == Op::Shl {
                int::shl(a, n, bits)
            } else {
                int::shr(a, n, bits, signed)
            }
        }
        Op::Bfi => {
            let (a, b) = (r(ctx, t, 0)?, r(ctx, t, 1)?);
            let pos = read(ctx, t, &inst.s[2], Ty::U32, line)?;
            let len = read(ctx, t, &inst.s[3], Ty::U32, line)?;
            int::bfi(a, b, pos, len, bits)
        }
        Op::Bfe => {
            let a = r(ctx, t, 0)?;
            let pos = read(ctx, t, &inst.s[1], Ty::U32, line)?;
            let len = read(ctx, t, &inst.s[2], Ty::U32, line)?;
            int::bfe(a, pos, len, bits, signed)
        }
        Op::Clz | Op::Popc | Op::Brev => {
            let sty = if inst.op == Op::Brev { ty } else { inst.ty2 };
            let a = read(ctx, t, &inst.s[0], sty, line)?;
            let sb = sty.bits();
            match inst.op {
                Op::Clz => (a.leading_zeros() - (64 - sb)) as u64,
                Op::Popc => a.count_ones() as u64,
                _ => a.reverse_bits() >> (64 - sb),
            }
        }
        Op::Setp => {
            let sty = inst.ty2;
            let a = read(ctx, t, &inst.s[0], sty, line)?;
            let b = read(ctx, t, &inst.s[1], sty, line)?;
            let mut p = compare(m.cmp.unwrap_or(Cmp::Eq), sty, a, b, m.ftz);
            let mut q = !p;
            if let Some(op) = m.bool_op {
                let c = read(ctx, t, &inst.s[2], Ty::Pred, line)? == 1;
                let f = |x: bool| match op {
                    BoolOp::And => x && c,
                    BoolOp::Or => x || c,
                    BoolOp::Xor => x ^ c,
                };
                (p, q) = (f(p), f(q));
            }
            match &inst.d[0] {
                Operand::Pair(pr, qr) => {
                    write(t, &Operand::Reg(*pr), p as u64, Ty::Pred, line)?;
                    if let Some(qr) = qr {
                        write(t, &Operand::Reg(*qr), q as u64, Ty::Pred, line)?;
                    }
                }
                d => write(t, d, p as u64, Ty::Pred, line)?,
            }
            return Ok(Flow::Next);
        }
        Op::Selp => {
            let c = read(ctx, t, &inst.s[2], Ty::Pred, line)?;
            if c == 1 {
                r(ctx, t, 0)?
            } else {
                r(ctx, t, 1)?
            }
        }
        Op::Copysign => {
            let (a, b) = (r(ctx, t, 0)?, r(ctx, t, 1)?);
            let sign = 1u64 << (bits - 1);
            (b & !sign) | (a & sign)
        }
        Op::Mov => return exec_mov(ctx, t, inst),
        Op::Cvt => {
            if matches!(ty, Ty::F16x2 | Ty::Bf16x2) {
                let a = f32v(read(ctx, t, &inst.s[0], Ty::F32, line)?);
                let b = f32v(read(ctx, t, &inst.s[1], Ty::F32, line)?);
                let f = if ty == Ty::F16x2 {
                    cvt::f32_to_f16
                } else {
                    cvt::f32_to_bf16
                };
                // `a` goes to the upper half.
                ((f(a) as u64) << 16) | f(b) as u64
            } else {
                let a = read(ctx, t, &inst.s[0], inst.ty2, line)?;
                cvt::convert(ty, inst.ty2, m, a)
            }
        }
        Op::Cvta => {
            let a = r(ctx, t, 0)?;
            let space = m.space.unwrap_or(Space::Global);
            let window = match space {
                Space::Shared => SHARED_WINDOW,
                Space::Local => LOCAL_WINDOW,
                _ => 0,
            };
            if window == 0 {
                a
            } else if m.to {
                if a < window || a >= window + WINDOW_SIZE {
                    return Err(ctx.err(ErrorKind::Memory, t, line, format!("cvta.to.{space:?} of {a:#x}, which is not a generic address in that window").to_lowercase()));
                }
                a - window
            } else {
                a.wrapping_add(window)
            }
        }
        Op::Ld => return exec_ld(ctx, t, inst),
        Op::St => return exec_st(ctx, t, inst),
        Op::Bar => {
            let id = r(ctx, t, 0)?;
            if id != 0 {
                return Err(PtxError::unimplemented(
                    line,
                    format!("barrier {id} (only barrier 0)"),
                ));
            }
            t.st = St::Bar;
            t.wait_line = line;
            if let Some(fr) = t.frames.last_mut() {
                fr.pc += 1;
            }
            return Ok(Flow::Block);
        }
        Op::Shfl | Op::Ldmatrix | Op::Mma => {
            t.st = St::Shfl;
            t.wait_line = line;
            return Ok(Flow::Block);
        }
        Op::Bra => {
            let Some(Operand::Label(target)) = inst.s.first() else {
                return Err(PtxError::parse(line, "branch without a label"));
            };
            if let Some(fr) = t.frames.last_mut() {
                fr.pc = *target;
            }
            return Ok(Flow::Jumped);
        }
        Op::Call => {
            let (Some(Operand::Func(f)), Some(Operand::Params(args)), Some(Operand::Params(rets))) =
                (inst.s.first(), inst.s.get(1), inst.d.first())
            else {
                return Err(PtxError::parse(line, "malformed call"));
            };
            let callee = &ctx.m.functions[*f as usize];
            if args.len() != callee.params.len() || rets.len() != callee.rets.len() {
                return Err(ctx.err(
                    ErrorKind::Launch,
                    t,
                    line,
                    format!(
                        "call of `{}` with {} arguments and {} results; it takes {} and {}",
                        callee.name,
                        args.len(),
                        rets.len(),
                        callee.params.len(),
                        callee.rets.len()
                    ),
                ));
            }
            let mut pbuf = vec![0u8; callee.param_size as usize];
            let fr = t
                .frames
                .last_mut()
                .ok_or_else(|| PtxError::launch("no frame"))?;
            for (&(off, size), decl) in args.iter().zip(&callee.params) {
                let n = size.min(decl.size) as usize;
                let src = fr
                    .params
                    .get(off as usize..off as usize + n)
                    .ok_or_else(|| {
                        PtxError::parse(line, "call argument outside the parameter area")
                    })?;
                pbuf[decl.offset as usize..decl.offset as usize + n].copy_from_slice(src);
            }
            fr.pc += 1;
            let nf = new_frame(ctx, t, *f, pbuf, rets.clone())?;
            t.frames.push(nf);
            return Ok(Flow::Jumped);
        }
        Op::CpAsync => return exec_cp_async(ctx, t, inst),
        Op::CpCommit => {
            for p in t.pending.iter_mut().filter(|p| p.0 == u32::MAX) {
                p.0 = t.next_group;
            }
            t.next_group += 1;
            return Ok(Flow::Next);
        }
        Op::CpWait => {
            let n = match inst.s.first() {
                Some(o) => read(ctx, t, o, Ty::U32, line)? as u32,
                None => {
                    // wait_all: commit, then wait for everything.
                    for p in t.pending.iter_mut().filter(|p| p.0 == u32::MAX) {
                        p.0 = t.next_group;
                    }
                    t.next_group += 1;
                    0
                }
            };
            let done_below = t.next_group.saturating_sub(n);
            let shared_pending = &mut ctx.shared_pending;
            t.pending.retain(|&(g, off, len)| {
                let done = g != u32::MAX && g < done_below;
                if done {
                    for b in &mut shared_pending[off as usize..(off + len) as usize] {
                        *b = false;
                    }
                }
                !done
            });
            return Ok(Flow::Next);
        }
        Op::Ret | Op::Exit => {
            if (inst.op == Op::Exit || t.frames.len() == 1) && !t.pending.is_empty() {
                return Err(ctx.err(
                    ErrorKind::Memory,
                    t,
                    line,
                    format!(
                        "exits with {} cp.async copies never waited for",
                        t.pending.len()
                    ),
                ));
            }
            if inst.op == Op::Exit || t.frames.len() == 1 {
                t.st = St::Exited;
                t.wait_line = line;
                return Ok(Flow::Block);
            }
            let Some(done) = t.frames.pop() else {
                return Err(PtxError::launch("no frame"));
            };
            let callee = &ctx.m.functions[done.func as usize];
            let fr = t
                .frames
                .last_mut()
                .ok_or_else(|| PtxError::launch("no frame"))?;
            for (&(off, size), decl) in done.rets.iter().zip(&callee.rets) {
                let n = size.min(decl.size) as usize;
                let src = &done.params[decl.offset as usize..decl.offset as usize + n];
                if let Some(dst) = fr.params.get_mut(off as usize..off as usize + n) {
                    dst.copy_from_slice(src);
                }
            }
            t.local.truncate(done.local_base as usize);
            return Ok(Flow::Jumped);
        }
        Op::Rcp | Op::Sqrt | Op::Rsqrt | Op::Ex2 | Op::Lg2 | Op::Sin | Op::Cos | Op::Tanh => {
            let a = r(ctx, t, 0)?;
            if ty == Ty::F32 {
                b32(float::unary32(inst.op, f32v(a), m.ftz))
            } else {
                float::unary64(inst.op, f64v(a)).to_bits()
            }
        }
    };
    write(t, &inst.d[0], v, ty, line)?;
    Ok(Flow::Next)
}

fn exec_mov(ctx: &mut Ctx, t: &mut Thread, inst: &Inst) -> Result<Flow> {
    let ty = inst.ty;
    let line = inst.line;
    match (&inst.d[0], &inst.s[0]) {
        (Operand::Vec(parts), src) => {
            let n = parts.len() as u32;
            let v = read(ctx, t, src, ty, line)?;
            let eb = ty.bits() / n;
            for (i, p) in parts.iter().enumerate() {
                if let Some(p) = p {
                    let e = (v >> (eb * i as u32)) & int::mask(eb);
                    write(t, p, e, Ty::B64, line)?;
                }
            }
        }
        (d, Operand::Vec(parts)) => {
            let n = parts.len() as u32;
            let eb = ty.bits() / n;
            let ety = match eb {
                8 => Ty::B8,
                16 => Ty::B16,
                32 => Ty::B32,
                _ => Ty::B64,
            };
            let mut v = 0u64;
            for (i, p) in parts.iter().enumerate() {
                let Some(p) = p else {
                    return Err(PtxError::parse(line, "`_` in a mov source"));
                };
                v |= read(ctx, t, p, ety, line)? << (eb * i as u32);
            }
            write(t, d, v, ty, line)?;
        }
        (d, s) => {
            let v = read(ctx, t, s, ty, line)?;
            write(t, d, v, ty, line)?;
        }
    }
    Ok(Flow::Next)
}
