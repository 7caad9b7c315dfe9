//! Memory instructions: address resolution across state spaces, `ld`/`st`, `cp.async`, and
//! the sanitizer checks on every access.

use super::*;

pub(super) fn address(
    ctx: &Ctx,
    t: &Thread,
    op: &Operand,
    line: u32,
) -> Result<(u64, Option<Symbol>)> {
    let fr = t
        .frames
        .last()
        .ok_or_else(|| PtxError::launch("no frame"))?;
    match op {
        Operand::Addr(AddrBase::Reg(r), off) => {
            Ok((fr.regs[*r as usize].wrapping_add(*off as u64), None))
        }
        Operand::Addr(AddrBase::Sym(s), off) => Ok((
            sym_addr(ctx, fr, *s, line)?.wrapping_add(*off as u64),
            Some(*s),
        )),
        Operand::Addr(AddrBase::Abs, off) => Ok((*off as u64, None)),
        _ => Err(PtxError::parse(line, "expected an address")),
    }
}

/// Where an access goes after resolving generic addresses.
pub(super) enum Target {
    Global(u64),
    Shared(u64),
    Local(u64),
    Param(u64),
}

pub(super) fn target(space: Space, addr: u64) -> Target {
    match space {
        Space::Shared => Target::Shared(addr & 0xffff_ffff),
        Space::Local => Target::Local(addr & 0xffff_ffff),
        Space::Param => Target::Param(addr),
        Space::Global | Space::Const => Target::Global(addr),
        Space::Generic => {
            if (SHARED_WINDOW..SHARED_WINDOW + WINDOW_SIZE).contains(&addr) {
                Target::Shared(addr - SHARED_WINDOW)
            } else if (LOCAL_WINDOW..LOCAL_WINDOW + WINDOW_SIZE).contains(&addr) {
                Target::Local(addr - LOCAL_WINDOW)
            } else {
                Target::Global(addr)
            }
        }
    }
}

pub(super) fn access(
    ctx: &mut Ctx,
    t: &mut Thread,
    space: Space,
    addr: u64,
    buf: &mut [u8],
    store: bool,
    line: u32,
) -> Result<()> {
    let n = buf.len();
    if !addr.is_multiple_of(n as u64) {
        return Err(ctx.err(
            ErrorKind::Memory,
            t,
            line,
            format!(
                "misaligned {n}-byte {} at {addr:#x}",
                if store { "store" } else { "load" }
            ),
        ));
    }
    let verb = if store { "store" } else { "load" };
    match target(space, addr) {
        Target::Global(a) => {
            if (GLOBALS_BASE..GLOBALS_BASE + WINDOW_SIZE).contains(&a) {
                let off = (a - GLOBALS_BASE) as usize;
                let Some(slot) = ctx.globals.get_mut(off..off + n) else {
                    return Err(ctx.err(
                        ErrorKind::Memory,
                        t,
                        line,
                        format!(
                            "out-of-bounds global {verb} of {n} bytes at {a:#x} (module variables)"
                        ),
                    ));
                };
                if store {
                    slot.copy_from_slice(buf);
                } else {
                    buf.copy_from_slice(slot);
                }
                return Ok(());
            }
            let r = if store {
                ctx.mem.write(a, buf)
            } else {
                ctx.mem.read(a, buf)
            };
            r.map_err(|e| {
                ctx.err(
                    ErrorKind::Memory,
                    t,
                    line,
                    format!("invalid global {verb} of {n} bytes at {a:#x}: {e}"),
                )
            })
        }
        Target::Shared(a) => {
            let len = ctx.shared.len() as u64;
            if a.saturating_add(n as u64) > len {
                return Err(ctx.err(ErrorKind::Memory, t, line, format!("out-of-bounds shared {verb} of {n} bytes at offset {a:#x} (shared size {len})")));
            }
            let r = a as usize..a as usize + n;
            if let Some(race) = ctx.races.access(t.linear, r.clone(), store, line) {
                let [bx, by, _] = ctx.cfg.block;
                let o = race.other.thread;
                let other = if o == sanitize::MANY {
                    "several threads".to_string()
                } else {
                    format!("thread {}", dims([o % bx, (o / bx) % by, o / (bx * by)]))
                };
                return Err(ctx.err(
                    ErrorKind::Memory,
                    t,
                    line,
                    format!(
                        "shared-memory race: {verb} of offset {:#x}, which {other} {} at PTX line {} with no bar.sync between",
                        race.offset,
                        if race.other_wrote { "wrote" } else { "read" },
                        race.other.line
                    ),
                ));
            }
            if store {
                ctx.shared[r.clone()].copy_from_slice(buf);
                ctx.shared_init[r].iter_mut().for_each(|b| *b = true);
            } else {
                if ctx.shared_pending[r.clone()].iter().any(|&b| b) {
                    return Err(ctx.err(ErrorKind::Memory, t, line, format!("read of shared memory at offset {a:#x}, a cp.async destination, before its cp.async.wait_group")));
                }
                if let Some(i) = sanitize::first_unset(&ctx.shared_init[r.clone()]) {
                    return Err(ctx.err(
                        ErrorKind::Memory,
                        t,
                        line,
                        format!(
                            "read of uninitialised shared memory at offset {:#x}",
                            a as usize + i
                        ),
                    ));
                }
                buf.copy_from_slice(&ctx.shared[r]);
            }
            Ok(())
        }
        Target::Local(a) => {
            let len = t.local.len() as u64;
            if a.saturating_add(n as u64) > len {
                return Err(ctx.err(ErrorKind::Memory, t, line, format!("out-of-bounds local {verb} of {n} bytes at offset {a:#x} (local size {len})")));
            }
            let r = a as usize..a as usize + n;
            if store {
                t.local[r].copy_from_slice(buf);
            } else {
                buf.copy_from_slice(&t.local[r]);
            }
            Ok(())
        }
        Target::Param(a) => {
            let fr = t
                .frames
                .last_mut()
                .ok_or_else(|| PtxError::launch("no frame"))?;
            let len = fr.params.len() as u64;
            if a.saturating_add(n as u64) > len {
                return Err(ctx.err(
                    ErrorKind::Memory,
                    t,
                    line,
                    format!("out-of-bounds param {verb} of {n} bytes at offset {a}"),
                ));
            }
            let r = a as usize..a as usize + n;
            if store {
                fr.params[r].copy_from_slice(buf);
            } else {
                buf.copy_from_slice(&fr.params[r]);
            }
            Ok(())
        }
    }
}

pub(super) fn elems(op: &Operand) -> Vec<Option<&Operand>> {
    match op {
        Operand::Vec(v) => v.iter().map(Option::as_ref).collect(),
        o => vec![Some(o)],
    }
}

pub(super) fn exec_ld(ctx: &mut Ctx, t: &mut Thread, inst: &Inst) -> Result<Flow> {
    let (addr, _) = address(ctx, t, &inst.s[0], inst.line)?;
    let ty = inst.ty;
    let es = ty.size() as usize;
    let dst = elems(&inst.d[0]);
    let mut buf = vec![0u8; es * dst.len()];
    let space = inst.m.space.unwrap_or(Space::Generic);
    access(ctx, t, space, addr, &mut buf, false, inst.line)?;
    for (i, d) in dst.iter().enumerate() {
        let mut b = [0u8; 8];
        b[..es].copy_from_slice(&buf[i * es..(i + 1) * es]);
        let mut v = u64::from_le_bytes(b);
        if ty.signed() {
            v = int::sext(v, ty.bits()) as u64;
        }
        if let Some(d) = d {
            write(t, d, v, if ty.signed() { Ty::B64 } else { ty }, inst.line)?;
        }
    }
    Ok(Flow::Next)
}

pub(super) fn exec_st(ctx: &mut Ctx, t: &mut Thread, inst: &Inst) -> Result<Flow> {
    let (addr, _) = address(ctx, t, &inst.s[0], inst.line)?;
    let ty = inst.ty;
    let es = ty.size() as usize;
    let src = elems(&inst.s[1]);
    let mut buf = vec![0u8; es * src.len()];
    for (i, s) in src.iter().enumerate() {
        let Some(s) = s else {
            return Err(PtxError::parse(inst.line, "`_` in a store"));
        };
        let v = read(ctx, t, s, ty, inst.line)?;
        buf[i * es..(i + 1) * es].copy_from_slice(&v.to_le_bytes()[..es]);
    }
    let space = inst.m.space.unwrap_or(Space::Generic);
    access(ctx, t, space, addr, &mut buf, true, inst.line)?;
    Ok(Flow::Next)
}

pub(super) fn exec_cp_async(ctx: &mut Ctx, t: &mut Thread, inst: &Inst) -> Result<Flow> {
    let line = inst.line;
    let (dst, _) = address(ctx, t, &inst.s[0], line)?;
    let (src, _) = address(ctx, t, &inst.s[1], line)?;
    let size = read(ctx, t, &inst.s[2], Ty::U32, line)? as usize;
    if !matches!(size, 4 | 8 | 16) {
        return Err(PtxError::parse(
            line,
            format!("cp.async size {size} (must be 4, 8 or 16)"),
        ));
    }
    let src_size = match inst.s.get(3) {
        Some(o) => (read(ctx, t, o, Ty::U32, line)? as usize).min(size),
        None => size,
    };
    if !src.is_multiple_of(size as u64) {
        return Err(ctx.err(
            ErrorKind::Memory,
            t,
            line,
            format!("misaligned {size}-byte cp.async source at {src:#x}"),
        ));
    }
    // The copy is done at issue (its completion may be any time before the wait); the
    // destination stays marked pending until the wait so an early read is caught.
    let mut buf = vec![0u8; size];
    // The source is aligned to the copy size (checked above); a partial source is read byte
    // by byte so the alignment check does not apply to its odd length.
    if src_size == size {
        access(ctx, t, Space::Global, src, &mut buf, false, line)?;
    } else {
        for i in 0..src_size {
            access(
                ctx,
                t,
                Space::Global,
                src + i as u64,
                &mut buf[i..i + 1],
                false,
                line,
            )?;
        }
    }
    access(ctx, t, Space::Shared, dst, &mut buf, true, line)?;
    let off = (dst & 0xffff_ffff) as u32;
    for b in &mut ctx.shared_pending[off as usize..off as usize + size] {
        *b = true;
    }
    t.pending.push((u32::MAX, off, size as u32));
    Ok(Flow::Next)
}
