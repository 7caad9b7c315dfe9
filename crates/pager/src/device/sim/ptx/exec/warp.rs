//! Warp collectives: `shfl.sync` (with member masks) and the `.aligned` matrix instructions
//! `ldmatrix` and `mma.sync`, fired once every lane they need has arrived.

use super::*;

/// Fires the complete `shfl.sync` groups of warp `w`; true if any fired.
pub(super) fn fire_shfl(ctx: &mut Ctx, threads: &mut [Thread], w: usize) -> Result<bool> {
    let lo = w * 32;
    let hi = (lo + 32).min(threads.len());
    let mut fired = false;
    for lane in 0..hi - lo {
        let t = &threads[lo + lane];
        if t.st != St::Shfl {
            continue;
        }
        let inst = cur_inst(ctx, t)?;
        if inst.op != Op::Shfl {
            if fire_matrix(ctx, threads, w, lane, inst)? {
                fired = true;
            }
            continue;
        }
        let mask = read(ctx, t, &inst.s[3], Ty::B32, inst.line)? as u32;
        if mask & (1 << lane) == 0 {
            return Err(ctx.err(
                ErrorKind::Deadlock,
                t,
                inst.line,
                format!("shfl.sync member mask {mask:#010x} excludes the executing lane {lane}"),
            ));
        }
        let mut all = true;
        for j in 0..32 {
            if mask & (1 << j) == 0 {
                continue;
            }
            match threads.get(lo + j).map(|t| t.st) {
                Some(St::Shfl) => {}
                Some(St::Exited) | None => {
                    return Err(PtxError::new(
                        ErrorKind::Deadlock,
                        format!(
                            "deadlock in kernel {}, block {}, warp {w}: thread {} waits at shfl.sync (PTX line {}) for lane {j}, which {}",
                            ctx.kernel,
                            dims(ctx.ctaid),
                            dims(t.tid),
                            inst.line,
                            if lo + j < threads.len() { "has exited" } else { "does not exist" }
                        ),
                    ))
                }
                _ => all = false,
            }
        }
        if !all {
            continue;
        }
        // Everyone in the mask is here: each lane computes from the sources of the others.
        let mut vals = [0u64; 32];
        let mut srcs = [(0u32, false); 32];
        for j in 0..32usize {
            if mask & (1 << j) == 0 {
                continue;
            }
            let tj = &threads[lo + j];
            let ij = cur_inst(ctx, tj)?;
            vals[j] = read(ctx, tj, &ij.s[0], Ty::B32, ij.line)?;
            let b = read(ctx, tj, &ij.s[1], Ty::B32, ij.line)? as u32;
            let c = read(ctx, tj, &ij.s[2], Ty::B32, ij.line)? as u32;
            srcs[j] = shfl_src(ij.m.shfl.unwrap_or(ShflMode::Idx), j as u32, b, c);
        }
        for j in 0..32usize {
            if mask & (1 << j) == 0 {
                continue;
            }
            let (src, valid) = srcs[j];
            let tj = &threads[lo + j];
            let ij = cur_inst(ctx, tj)?;
            if mask & (1 << src) == 0 {
                return Err(ctx.err(
                    ErrorKind::Memory,
                    tj,
                    ij.line,
                    format!("shfl.sync reads lane {src}, which is not in member mask {mask:#010x}"),
                ));
            }
            let v = vals[src as usize];
            let tj = &mut threads[lo + j];
            let fr = tj
                .frames
                .last_mut()
                .ok_or_else(|| PtxError::launch("no frame"))?;
            match &ij.d[0] {
                Operand::Reg(r) => fr.regs[*r as usize] = v & 0xffff_ffff,
                Operand::Pair(r, p) => {
                    fr.regs[*r as usize] = v & 0xffff_ffff;
                    if let Some(p) = p {
                        fr.regs[*p as usize] = valid as u64;
                    }
                }
                _ => return Err(PtxError::parse(ij.line, "bad shfl destination")),
            }
            fr.pc += 1;
            tj.st = St::Ready;
        }
        fired = true;
    }
    Ok(fired)
}

/// Source lane and validity of `shfl.sync` (PTX ISA pseudocode).
pub fn shfl_src(mode: ShflMode, lane: u32, b: u32, c: u32) -> (u32, bool) {
    let bval = b & 31;
    let cval = c & 31;
    let segmask = (c >> 8) & 31;
    let max_lane = (lane & segmask) | (cval & !segmask);
    let min_lane = lane & segmask;
    let (j, p) = match mode {
        ShflMode::Up => {
            let j = lane as i32 - bval as i32;
            (j, j >= max_lane as i32)
        }
        ShflMode::Down => {
            let j = (lane + bval) as i32;
            (j, j <= max_lane as i32)
        }
        ShflMode::Bfly => {
            let j = (lane ^ bval) as i32;
            (j, j <= max_lane as i32)
        }
        ShflMode::Idx => {
            let j = (min_lane | (bval & !segmask)) as i32;
            (j, j <= max_lane as i32)
        }
    };
    if p {
        (j as u32 & 31, true)
    } else {
        (lane, false)
    }
}

pub(super) fn vec_regs(op: &Operand, line: u32) -> Result<Vec<u32>> {
    let one = |o: &Operand| match o {
        Operand::Reg(r) => Ok(*r),
        _ => Err(PtxError::parse(line, "expected registers in a fragment")),
    };
    match op {
        Operand::Vec(v) => v
            .iter()
            .map(|o| {
                o.as_ref()
                    .map_or(Err(PtxError::parse(line, "`_` in a fragment")), one)
            })
            .collect(),
        o => Ok(vec![one(o)?]),
    }
}

/// Fires `ldmatrix` / `mma.sync` for warp `w` once all its lanes are there (they are `.aligned`:
/// the whole warp executes them together).
pub(super) fn fire_matrix(
    ctx: &mut Ctx,
    threads: &mut [Thread],
    w: usize,
    lane: usize,
    inst: &Inst,
) -> Result<bool> {
    let lo = w * 32;
    let name = if inst.op == Op::Mma {
        "mma.sync"
    } else {
        "ldmatrix"
    };
    for j in 0..32 {
        match threads.get(lo + j).map(|t| t.st) {
            Some(St::Shfl) => {}
            Some(St::Exited) | None => {
                return Err(PtxError::new(
                    ErrorKind::Deadlock,
                    format!(
                        "deadlock in kernel {}, block {}, warp {w}: thread {} waits at {name} (PTX line {}) for lane {j}, which {}",
                        ctx.kernel,
                        dims(ctx.ctaid),
                        dims(threads[lo + lane].tid),
                        inst.line,
                        if lo + j < threads.len() { "has exited" } else { "does not exist" }
                    ),
                ))
            }
            _ => return Ok(false),
        }
    }
    for j in 0..32 {
        let ij = cur_inst(ctx, &threads[lo + j])?;
        if ij.op != inst.op {
            return Err(ctx.err(ErrorKind::Deadlock, &threads[lo + j], ij.line, format!("lane {j} reached a different warp collective than lane {lane} ({name}, PTX line {})", inst.line)));
        }
    }
    let mut out = vec![Vec::new(); 32];
    if inst.op == Op::Ldmatrix {
        let num = inst.m.vec as usize;
        // rows[i][r]: the 8 b16 elements of row r of matrix i, addressed by lane 8i + r.
        let mut rows = vec![[[0u16; 8]; 8]; num];
        for (i, mat) in rows.iter_mut().enumerate() {
            for (r, row) in mat.iter_mut().enumerate() {
                let t = &mut threads[lo + 8 * i + r];
                let ij = cur_inst(ctx, t)?;
                let (addr, _) = address(ctx, t, &ij.s[0], ij.line)?;
                let mut buf = [0u8; 16];
                access(ctx, t, Space::Shared, addr, &mut buf, false, ij.line)?;
                for (c, v) in row.iter_mut().enumerate() {
                    *v = u16::from_le_bytes([buf[2 * c], buf[2 * c + 1]]);
                }
            }
        }
        for (l, o) in out.iter_mut().enumerate() {
            let (g, c) = (l / 4, 2 * (l % 4));
            for mat in &rows {
                let (a, b) = if inst.m.trans {
                    (mat[c][g], mat[c + 1][g])
                } else {
                    (mat[g][c], mat[g][c + 1])
                };
                o.push(a as u64 | (b as u64) << 16);
            }
        }
    } else {
        let to_f = |bits: u16| -> f64 {
            if inst.ty2 == Ty::Bf16 {
                half::bf16::from_bits(bits).to_f64()
            } else {
                half::f16::from_bits(bits).to_f64()
            }
        };
        let mut a = [[0f64; 16]; 16];
        let mut b = [[0f64; 8]; 16];
        let mut c = [[0f64; 8]; 16];
        for l in 0..32 {
            let t = &threads[lo + l];
            let ij = cur_inst(ctx, t)?;
            let (g, q) = (l / 4, 2 * (l % 4));
            let ra = vec_regs(&ij.s[0], ij.line)?;
            let rb = vec_regs(&ij.s[1], ij.line)?;
            let rc = vec_regs(&ij.s[2], ij.line)?;
            if ra.len() != 4
                || rb.len() != 2
                || rc.len() != 4
                || vec_regs(&ij.d[0], ij.line)?.len() != 4
            {
                return Err(PtxError::parse(
                    ij.line,
                    "mma.m16n8k16 takes fragments of 4, 4, 2 and 4 registers",
                ));
            }
            let fr = t
                .frames
                .last()
                .ok_or_else(|| PtxError::launch("no frame"))?;
            let reg = |r: u32| fr.regs[r as usize];
            // A (row-major 16x16): {a0,a1} row g, {a2,a3} row g+8, {a4..a7} the same at k+8.
            for (i, &r) in ra.iter().enumerate() {
                let (row, col) = (g + 8 * (i & 1), q + 8 * (i >> 1));
                let v = reg(r);
                a[row][col] = to_f(v as u16);
                a[row][col + 1] = to_f((v >> 16) as u16);
            }
            // B (16x8, column-major): {b0,b1} k = q, q+1 of column g; {b2,b3} k + 8.
            for (i, &r) in rb.iter().enumerate() {
                let v = reg(r);
                b[q + 8 * i][g] = to_f(v as u16);
                b[q + 8 * i + 1][g] = to_f((v >> 16) as u16);
            }
            for (i, &r) in rc.iter().enumerate() {
                c[g + 8 * (i >> 1)][q + (i & 1)] = f32::from_bits(reg(r) as u32) as f64;
            }
        }
        for (l, o) in out.iter_mut().enumerate() {
            let (g, q) = (l / 4, 2 * (l % 4));
            for i in 0..4 {
                let (row, col) = (g + 8 * (i >> 1), q + (i & 1));
                // Products of f16/bf16 are exact in f64; the sum is accumulated in f64 in k order
                // and rounded once to f32.
                let mut acc = c[row][col];
                for (k, brow) in b.iter().enumerate() {
                    acc += a[row][k] * brow[col];
                }
                o.push((acc as f32).to_bits() as u64);
            }
        }
    }
    for (l, vals) in out.into_iter().enumerate() {
        let t = &mut threads[lo + l];
        let ij = cur_inst(ctx, t)?;
        let regs = vec_regs(&ij.d[0], ij.line)?;
        if regs.len() != vals.len() {
            return Err(PtxError::parse(
                ij.line,
                format!(
                    "{name} writes {} registers, {} given",
                    vals.len(),
                    regs.len()
                ),
            ));
        }
        let fr = t
            .frames
            .last_mut()
            .ok_or_else(|| PtxError::launch("no frame"))?;
        for (r, v) in regs.iter().zip(vals) {
            fr.regs[*r as usize] = v;
        }
        fr.pc += 1;
        t.st = St::Ready;
    }
    Ok(true)
}
