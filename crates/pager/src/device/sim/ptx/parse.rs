//! Parses PTX text into the [`Module`] IR, resolving names at parse time.

use super::error::{ErrorKind, PtxError, Result};
use super::ir::*;
use super::lexer::{lex, Tok, Token};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
enum Entry {
    Reg(u32),
    Range(u32, u32),
    Sym(Symbol, u32),
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
    module_syms: HashMap<String, (Symbol, u32)>,
    functions: Vec<Function>,
    by_name: HashMap<String, u32>,
    shared: Vec<SharedVar>,
    globals: Vec<u8>,
}

struct FnCtx {
    scopes: Vec<HashMap<String, Entry>>,
    nregs: u32,
    param_size: u32,
    local_size: u32,
    local_align: u32,
    body: Vec<Inst>,
    labels: HashMap<String, u32>,
    fixups: Vec<(usize, usize, String, u32)>,
    unsupported: Vec<PtxError>,
    shared_used: Vec<u32>,
    calls: Vec<u32>,
}

fn align_up(v: u32, a: u32) -> u32 {
    let a = a.max(1);
    v.div_ceil(a).saturating_mul(a)
}

/// Largest register file, parameter area, local depot or module-globals size accepted: larger
/// declarations are refused rather than allocated.
const MAX_DECL: u32 = 64 << 20;

fn check_size(v: u32, what: &str, line: u32) -> Result<u32> {
    if v > MAX_DECL {
        return Err(PtxError::unimplemented(
            line,
            format!("{what} of {v} (more than {MAX_DECL})"),
        ));
    }
    Ok(v)
}

/// Parses a whole PTX module.
pub fn parse_module(src: &str) -> Result<Module> {
    let toks = lex(src)?;
    let mut p = Parser {
        toks,
        pos: 0,
        module_syms: HashMap::new(),
        functions: Vec::new(),
        by_name: HashMap::new(),
        shared: Vec::new(),
        globals: Vec::new(),
    };
    p.module()?;
    Ok(Module {
        functions: p.functions,
        by_name: p.by_name,
        shared: p.shared,
        globals: p.globals,
    })
}

fn special(name: &str) -> Option<Special> {
    let dim = |s: &str| match s {
        "x" => Some(0u8),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    if let Some((base, d)) = name.split_once('.') {
        let d = dim(d)?;
        return Some(match base {
            "%tid" => Special::Tid(d),
            "%ntid" => Special::Ntid(d),
            "%ctaid" => Special::Ctaid(d),
            "%nctaid" => Special::Nctaid(d),
            _ => return None,
        });
    }
    Some(match name {
        "%laneid" => Special::LaneId,
        "%warpid" => Special::WarpId,
        "%nwarpid" => Special::NWarpId,
        "%globaltimer" => Special::GlobalTimer,
        "%clock" => Special::Clock,
        "%clock64" => Special::Clock64,
        "%smid" => Special::SmId,
        "%lanemask_eq" => Special::LaneMaskEq,
        "%lanemask_lt" => Special::LaneMaskLt,
        "%lanemask_le" => Special::LaneMaskLe,
        "%lanemask_gt" => Special::LaneMaskGt,
        "%lanemask_ge" => Special::LaneMaskGe,
        _ => return None,
    })
}

impl Parser {
    fn line(&self) -> u32 {
        self.toks
            .get(self.pos)
            .or(self.toks.last())
            .map_or(0, |t| t.line)
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }

    fn next(&mut self) -> Result<Tok> {
        let t = self
            .toks
            .get(self.pos)
            .ok_or_else(|| PtxError::parse(self.line(), "unexpected end of input"))?;
        self.pos += 1;
        Ok(t.tok.clone())
    }

    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }

    fn eat_punct(&mut self, c: char) -> bool {
        if self.is_punct(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_punct(&mut self, c: char) -> Result<()> {
        let line = self.line();
        match self.next()? {
            Tok::Punct(x) if x == c => Ok(()),
            t => Err(PtxError::parse(
                line,
                format!("expected `{c}`, found {t:?}"),
            )),
        }
    }

    fn word(&mut self) -> Result<String> {
        let line = self.line();
        match self.next()? {
            Tok::Word(w) => Ok(w),
            t => Err(PtxError::parse(
                line,
                format!("expected a name, found {t:?}"),
            )),
        }
    }

    fn is_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(x)) if x == w)
    }

    fn int(&mut self) -> Result<u64> {
        let line = self.line();
        let neg = self.eat_punct('-');
        match self.next()? {
            Tok::Int(v) => Ok(if neg { v.wrapping_neg() } else { v }),
            t => Err(PtxError::parse(
                line,
                format!("expected an integer, found {t:?}"),
            )),
        }
    }

    fn u32_val(&mut self) -> Result<u32> {
        let line = self.line();
        let v = self.int()?;
        u32::try_from(v).map_err(|_| PtxError::parse(line, format!("value {v} out of range")))
    }

    fn module(&mut self) -> Result<()> {
        while let Some(t) = self.peek().cloned() {
            let line = self.line();
            let Tok::Word(w) = t else {
                return Err(PtxError::parse(
                    line,
                    format!("unexpected {t:?} at module level"),
                ));
            };
            match w.as_str() {
                ".version" => {
                    self.pos += 1;
                    match self.next()? {
                        Tok::Float { .. } | Tok::Int(_) => {}
                        t => return Err(PtxError::parse(line, format!("bad .version {t:?}"))),
                    }
                }
                ".target" => {
                    self.pos += 1;
                    self.word()?;
                    while self.eat_punct(',') {
                        self.word()?;
                    }
                }
                ".address_size" => {
                    self.pos += 1;
                    let v = self.int()?;
                    if v != 64 {
                        return Err(PtxError::unimplemented(line, format!(".address_size {v}")));
                    }
                }
                ".visible" | ".extern" | ".weak" => {
                    let extern_ = w == ".extern";
                    self.pos += 1;
                    match self.peek() {
                        Some(Tok::Word(x)) if x == ".entry" || x == ".func" => self.function()?,
                        _ => self.module_var(extern_)?,
                    }
                }
                ".entry" | ".func" => self.function()?,
                ".global" | ".shared" | ".const" => self.module_var(false)?,
                _ => return Err(PtxError::unimplemented(line, format!("directive `{w}`"))),
            }
        }
        Ok(())
    }

    /// Parses `[.align N] [.vN] .type name[dims] [= init]` after the state space; returns
    /// (name, size, align, elem type, init values).
    #[allow(clippy::type_complexity)]
    fn var_decl(&mut self) -> Result<(String, u32, u32, Ty, Option<Vec<Tok>>, bool)> {
        let line = self.line();
        let mut align = 0;
        let mut vec = 1;
        let mut ty = None;
        while let Some(Tok::Word(w)) = self.peek().cloned() {
            if !w.starts_with('.') {
                break;
            }
            self.pos += 1;
            match w.as_str() {
                ".align" => align = self.u32_val()?,
                ".v2" => vec = 2,
                ".v4" => vec = 4,
                ".ptr" | ".global" | ".shared" | ".local" | ".const" => {}
                _ => {
                    ty = Some(Ty::from_name(&w[1..]).ok_or_else(|| {
                        PtxError::unimplemented(line, format!("variable type `{w}`"))
                    })?)
                }
            }
        }
        let ty = ty.ok_or_else(|| PtxError::parse(line, "variable without a type"))?;
        let name = self.word()?;
        let mut count = 1u32;
        let mut unsized_ = false;
        while self.eat_punct('[') {
            if self.eat_punct(']') {
                unsized_ = true;
                continue;
            }
            count = count.saturating_mul(self.u32_val()?);
            self.expect_punct(']')?;
        }
        let mut init = None;
        if self.eat_punct('=') {
            let mut vals = Vec::new();
            let mut depth = 0;
            loop {
                let t = self.next()?;
                match t {
                    Tok::Punct('{') => depth += 1,
                    Tok::Punct('}') => depth -= 1,
                    Tok::Punct(',') => {}
                    Tok::Punct('-') => match self.next()? {
                        Tok::Int(v) => vals.push(Tok::Int(v.wrapping_neg())),
                        Tok::Float { bits, double } => vals.push(Tok::Float {
                            bits: bits ^ if double { 1 << 63 } else { 1 << 31 },
                            double,
                        }),
                        t => return Err(PtxError::parse(line, format!("bad initialiser {t:?}"))),
                    },
                    Tok::Int(_) | Tok::Float { .. } => vals.push(t),
                    t => return Err(PtxError::unimplemented(line, format!("initialiser {t:?}"))),
                }
                if depth == 0 {
                    break;
                }
            }
            init = Some(vals);
        }
        self.expect_punct(';')?;
        let size = check_size(
            ty.size().saturating_mul(vec).saturating_mul(count),
            "variable size",
            line,
        )?;
        let align = if align == 0 { ty.size() * vec } else { align };
        Ok((name, size, align, ty, init, unsized_))
    }

    fn module_var(&mut self, extern_: bool) -> Result<()> {
        let line = self.line();
        let space = self.word()?;
        let (name, size, align, ty, init, unsized_) = self.var_decl()?;
        match space.as_str() {
            ".shared" => {
                let id = self.shared.len() as u32;
                self.shared.push(SharedVar {
                    name: name.clone(),
                    size: if unsized_ { 0 } else { size },
                    align,
                    dynamic: extern_ || unsized_,
                });
                self.module_syms.insert(name, (Symbol::Shared(id), size));
            }
            ".global" | ".const" => {
                let off = align_up(self.globals.len() as u32, align.max(8));
                self.globals.resize(off as usize, 0);
                let mut bytes = vec![0u8; size as usize];
                if let Some(vals) = init {
                    write_init(&mut bytes, ty, &vals, line)?;
                }
                self.globals.extend_from_slice(&bytes);
                check_size(
                    self.globals.len().min(u32::MAX as usize) as u32,
                    "module globals",
                    line,
                )?;
                self.module_syms
                    .insert(name, (Symbol::Global(GLOBALS_BASE + off as u64), size));
            }
            other => {
                return Err(PtxError::unimplemented(
                    line,
                    format!("module-level `{other}` variable"),
                ))
            }
        }
        Ok(())
    }

    fn param_list(&mut self, ctx: &mut FnCtx) -> Result<Vec<ParamDecl>> {
        let mut out = Vec::new();
        self.expect_punct('(')?;
        if self.eat_punct(')') {
            return Ok(out);
        }
        loop {
            let line = self.line();
            let w = self.word()?;
            if w != ".param" && w != ".reg" {
                return Err(PtxError::unimplemented(
                    line,
                    format!("parameter space `{w}`"),
                ));
            }
            let (name, size, align, _, _, _) = self.var_decl_no_semi()?;
            let off = align_up(ctx.param_size, align.max(1));
            ctx.param_size = check_size(off.saturating_add(size), "parameter area", line)?;
            ctx.scopes[0].insert(name.clone(), Entry::Sym(Symbol::Param(off), size));
            out.push(ParamDecl {
                name,
                offset: off,
                size,
            });
            if self.eat_punct(')') {
                return Ok(out);
            }
            self.expect_punct(',')?;
        }
    }

    #[allow(clippy::type_complexity)]
    fn var_decl_no_semi(&mut self) -> Result<(String, u32, u32, Ty, Option<Vec<Tok>>, bool)> {
        // Parameter declarations end at `,` or `)`: splice a `;` in by parsing manually.
        let line = self.line();
        let mut align = 0;
        let mut ty = None;
        while let Some(Tok::Word(w)) = self.peek().cloned() {
            if !w.starts_with('.') {
                break;
            }
            self.pos += 1;
            match w.as_str() {
                ".align" => align = self.u32_val()?,
                ".ptr" | ".global" | ".shared" | ".local" | ".const" => {}
                _ => {
                    ty = Some(Ty::from_name(&w[1..]).ok_or_else(|| {
                        PtxError::unimplemented(line, format!("parameter type `{w}`"))
                    })?)
                }
            }
        }
        let ty = ty.ok_or_else(|| PtxError::parse(line, "parameter without a type"))?;
        let name = self.word()?;
        let mut count: u32 = 1;
        while self.eat_punct('[') {
            count = check_size(
                count.saturating_mul(self.u32_val()?),
                "parameter size",
                line,
            )?;
            self.expect_punct(']')?;
        }
        let align = if align == 0 { ty.size() } else { align };
        Ok((name, ty.size() * count, align, ty, None, false))
    }

    fn function(&mut self) -> Result<()> {
        let line = self.line();
        let kind = self.word()?;
        let entry = kind == ".entry";
        let mut ctx = FnCtx {
            scopes: vec![HashMap::new()],
            nregs: 0,
            param_size: 0,
            local_size: 0,
            local_align: 16,
            body: Vec::new(),
            labels: HashMap::new(),
            fixups: Vec::new(),
            unsupported: Vec::new(),
            shared_used: Vec::new(),
            calls: Vec::new(),
        };
        let mut rets = Vec::new();
        if !entry && self.is_punct('(') {
            rets = self.param_list(&mut ctx)?;
        }
        let name = self.word()?;
        let params = if self.is_punct('(') {
            self.param_list(&mut ctx)?
        } else {
            Vec::new()
        };
        // Performance directives.
        while let Some(Tok::Word(w)) = self.peek().cloned() {
            match w.as_str() {
                ".maxntid" | ".reqntid" | ".minnctapersm" | ".maxnreg" | ".maxnctapersm"
                | ".noreturn" => {
                    self.pos += 1;
                    if w == ".noreturn" {
                        continue;
                    }
                    self.int()?;
                    while self.eat_punct(',') {
                        self.int()?;
                    }
                }
                _ => {
                    return Err(PtxError::unimplemented(
                        self.line(),
                        format!("directive `{w}`"),
                    ))
                }
            }
        }
        let idx = match self.by_name.get(&name) {
            Some(&i) => i,
            None => {
                let i = self.functions.len() as u32;
                self.functions.push(Function {
                    name: name.clone(),
                    entry,
                    params: params.clone(),
                    rets: rets.clone(),
                    param_size: ctx.param_size,
                    local_size: 0,
                    local_align: 16,
                    nregs: 0,
                    body: None,
                    unsupported: Vec::new(),
                    shared_used: Vec::new(),
                    calls: Vec::new(),
                    line,
                });
                self.by_name.insert(name.clone(), i);
                i
            }
        };
        if self.eat_punct(';') {
            return Ok(());
        }
        self.expect_punct('{')?;
        self.block(&mut ctx, idx)?;
        for (inst, opnd, label, l) in std::mem::take(&mut ctx.fixups) {
            let target = *ctx
                .labels
                .get(&label)
                .ok_or_else(|| PtxError::parse(l, format!("unknown label `{label}`")))?;
            ctx.body[inst].s[opnd] = Operand::Label(target);
        }
        let f = &mut self.functions[idx as usize];
        if f.body.is_some() {
            return Err(PtxError::parse(
                line,
                format!("function `{name}` defined twice"),
            ));
        }
        *f = Function {
            name,
            entry,
            params,
            rets,
            param_size: ctx.param_size,
            local_size: ctx.local_size,
            local_align: ctx.local_align,
            nregs: ctx.nregs,
            body: Some(ctx.body),
            unsupported: ctx.unsupported,
            shared_used: ctx.shared_used,
            calls: ctx.calls,
            line,
        };
        Ok(())
    }

    /// Parses statements until the `}` closing the current scope.
    fn block(&mut self, ctx: &mut FnCtx, fidx: u32) -> Result<()> {
        if ctx.scopes.len() > 256 {
            return Err(PtxError::parse(
                self.line(),
                "blocks nested more than 256 deep",
            ));
        }
        loop {
            let line = self.line();
            let t = self.next()?;
            match t {
                Tok::Punct('}') => return Ok(()),
                Tok::Punct('{') => {
                    ctx.scopes.push(HashMap::new());
                    self.block(ctx, fidx)?;
                    ctx.scopes.pop();
                }
                Tok::Punct('@') => {
                    let neg = self.eat_punct('!');
                    let pname = self.word()?;
                    let reg = self.lookup_reg(ctx, &pname, line)?;
                    let op = self.word()?;
                    self.instruction(ctx, op, Some((reg, neg)), line, fidx)?;
                }
                Tok::Word(w) if w.starts_with('.') => self.body_directive(ctx, &w, line)?,
                Tok::Word(w) => {
                    if self.eat_punct(':') {
                        if ctx
                            .labels
                            .insert(w.clone(), ctx.body.len() as u32)
                            .is_some()
                        {
                            return Err(PtxError::parse(
                                line,
                                format!("label `{w}` defined twice"),
                            ));
                        }
                    } else {
                        self.instruction(ctx, w, None, line, fidx)?;
                    }
                }
                t => return Err(PtxError::parse(line, format!("unexpected {t:?}"))),
            }
        }
    }

    fn body_directive(&mut self, ctx: &mut FnCtx, w: &str, line: u32) -> Result<()> {
        match w {
            ".reg" => {
                let tyw = self.word()?;
                let ty = tyw
                    .strip_prefix('.')
                    .and_then(Ty::from_name)
                    .ok_or_else(|| {
                        PtxError::unimplemented(line, format!("register type `{tyw}`"))
                    })?;
                let _ = ty;
                loop {
                    let name = self.word()?;
                    let scope = ctx
                        .scopes
                        .last_mut()
                        .ok_or_else(|| PtxError::parse(line, "no scope"))?;
                    if self.eat_punct('<') {
                        let n = self.u32_val()?;
                        self.expect_punct('>')?;
                        scope.insert(name, Entry::Range(ctx.nregs, n));
                        ctx.nregs =
                            check_size(ctx.nregs.saturating_add(n), "register count", line)?;
                    } else {
                        scope.insert(name, Entry::Reg(ctx.nregs));
                        ctx.nregs =
                            check_size(ctx.nregs.saturating_add(1), "register count", line)?;
                    }
                    if !self.eat_punct(',') {
                        break;
                    }
                }
                self.expect_punct(';')
            }
            ".param" => {
                let (name, size, align, _, _, _) = self.var_decl()?;
                let off = align_up(ctx.param_size, align.max(1));
                ctx.param_size = check_size(off.saturating_add(size), "parameter area", line)?;
                if let Some(s) = ctx.scopes.last_mut() {
                    s.insert(name, Entry::Sym(Symbol::Param(off), size));
                }
                Ok(())
            }
            ".local" => {
                let (name, size, align, _, init, _) = self.var_decl()?;
                if init.is_some() {
                    return Err(PtxError::unimplemented(line, "initialised .local variable"));
                }
                let off = align_up(ctx.local_size, align.max(1));
                ctx.local_size = check_size(off.saturating_add(size), "local depot", line)?;
                ctx.local_align = ctx.local_align.max(align);
                if let Some(s) = ctx.scopes.last_mut() {
                    s.insert(name, Entry::Sym(Symbol::Local(off), size));
                }
                Ok(())
            }
            ".shared" => {
                let (name, size, align, _, init, unsized_) = self.var_decl()?;
                if init.is_some() {
                    return Err(PtxError::unimplemented(
                        line,
                        "initialised .shared variable",
                    ));
                }
                let id = self.shared.len() as u32;
                self.shared.push(SharedVar {
                    name: name.clone(),
                    size,
                    align,
                    dynamic: unsized_,
                });
                if let Some(s) = ctx.scopes.last_mut() {
                    s.insert(name, Entry::Sym(Symbol::Shared(id), size));
                }
                Ok(())
            }
            ".pragma" => {
                // Optimisation hints (`"nounroll"`) do not change semantics.
                while !self.eat_punct(';') {
                    self.next()?;
                }
                Ok(())
            }
            _ => Err(PtxError::unimplemented(
                line,
                format!("directive `{w}` in a body"),
            )),
        }
    }

    fn lookup(&self, ctx: &FnCtx, name: &str) -> Option<Entry> {
        for scope in ctx.scopes.iter().rev() {
            if let Some(e) = scope.get(name) {
                return Some(*e);
            }
            let digits = name.len() - name.bytes().rev().take_while(u8::is_ascii_digit).count();
            if digits < name.len() {
                let (prefix, num) = name.split_at(digits);
                if let (Some(Entry::Range(base, n)), Ok(i)) =
                    (scope.get(prefix), num.parse::<u32>())
                {
                    if i < *n && (num == "0" || !num.starts_with('0')) {
                        return Some(Entry::Reg(base + i));
                    }
                }
            }
        }
        self.module_syms.get(name).map(|&(s, sz)| Entry::Sym(s, sz))
    }

    fn lookup_reg(&self, ctx: &FnCtx, name: &str, line: u32) -> Result<u32> {
        match self.lookup(ctx, name) {
            Some(Entry::Reg(r)) => Ok(r),
            _ => Err(PtxError::parse(line, format!("unknown register `{name}`"))),
        }
    }

    fn note_sym(ctx: &mut FnCtx, s: Symbol) {
        if let Symbol::Shared(id) = s {
            if !ctx.shared_used.contains(&id) {
                ctx.shared_used.push(id);
            }
        }
    }

    fn operand(&mut self, ctx: &mut FnCtx, line: u32) -> Result<Operand> {
        let t = self.next()?;
        Ok(match t {
            Tok::Punct('-') => match self.next()? {
                Tok::Int(v) => Operand::Imm(v.wrapping_neg()),
                Tok::Float { bits, double } => Operand::FImm {
                    bits: bits ^ if double { 1 << 63 } else { 1 << 31 },
                    double,
                },
                t => {
                    return Err(PtxError::parse(
                        line,
                        format!("bad operand after `-`: {t:?}"),
                    ))
                }
            },
            Tok::Punct('!') => {
                let w = self.word()?;
                Operand::NotPred(self.lookup_reg(ctx, &w, line)?)
            }
            Tok::Int(v) => Operand::Imm(v),
            Tok::Float { bits, double } => Operand::FImm { bits, double },
            Tok::Punct('{') => {
                let mut elems = Vec::new();
                loop {
                    if self.is_word("_") {
                        self.pos += 1;
                        elems.push(None);
                    } else {
                        elems.push(Some(self.operand(ctx, line)?));
                    }
                    if self.eat_punct('}') {
                        break;
                    }
                    self.expect_punct(',')?;
                }
                Operand::Vec(elems)
            }
            Tok::Punct('[') => {
                let mut base = AddrBase::Abs;
                let mut off: i64 = 0;
                if let Some(Tok::Word(w)) = self.peek().cloned() {
                    self.pos += 1;
                    base = match self.lookup(ctx, &w) {
                        Some(Entry::Reg(r)) => AddrBase::Reg(r),
                        Some(Entry::Sym(s, _)) => {
                            Self::note_sym(ctx, s);
                            AddrBase::Sym(s)
                        }
                        _ => {
                            return Err(PtxError::parse(
                                line,
                                format!("unknown name `{w}` in address"),
                            ))
                        }
                    };
                    if self.eat_punct('+') || self.is_punct('-') {
                        off = self.int()? as i64;
                    }
                } else {
                    off = self.int()? as i64;
                }
                self.expect_punct(']')?;
                Operand::Addr(base, off)
            }
            Tok::Word(w) => {
                if let Some(s) = special(&w) {
                    Operand::Special(s)
                } else {
                    match self.lookup(ctx, &w) {
                        Some(Entry::Reg(r)) => {
                            if self.eat_punct('|') {
                                let w2 = self.word()?;
                                Operand::Pair(r, Some(self.lookup_reg(ctx, &w2, line)?))
                            } else {
                                Operand::Reg(r)
                            }
                        }
                        Some(Entry::Sym(s, _)) => {
                            Self::note_sym(ctx, s);
                            if self.eat_punct('+') {
                                return Err(PtxError::unimplemented(line, "symbol+offset operand"));
                            }
                            Operand::Sym(s)
                        }
                        _ if w.starts_with('%') => {
                            return Err(PtxError::parse(line, format!("unknown register `{w}`")))
                        }
                        _ => return Err(PtxError::parse(line, format!("unknown name `{w}`"))),
                    }
                }
            }
            t => return Err(PtxError::parse(line, format!("unexpected operand {t:?}"))),
        })
    }

    fn param_names(&mut self, ctx: &FnCtx, line: u32) -> Result<Vec<(u32, u32)>> {
        self.expect_punct('(')?;
        let mut out = Vec::new();
        if self.eat_punct(')') {
            return Ok(out);
        }
        loop {
            let w = self.word()?;
            match self.lookup(ctx, &w) {
                Some(Entry::Sym(Symbol::Param(off), size)) => out.push((off, size)),
                _ => {
                    return Err(PtxError::parse(
                        line,
                        format!("`{w}` is not a .param variable"),
                    ))
                }
            }
            if self.eat_punct(')') {
                return Ok(out);
            }
            self.expect_punct(',')?;
        }
    }

    fn instruction(
        &mut self,
        ctx: &mut FnCtx,
        opcode: String,
        guard: Option<(u32, bool)>,
        line: u32,
        _fidx: u32,
    ) -> Result<()> {
        let parts: Vec<&str> = opcode.split('.').collect();
        let base = parts[0];
        // Operands.
        let mut ops = Vec::new();
        if base == "call" {
            let mut rets = Vec::new();
            if self.is_punct('(') {
                rets = self.param_names(ctx, line)?;
                self.expect_punct(',')?;
            }
            let fname = self.word()?;
            let f = *self.by_name.get(&fname).ok_or_else(|| {
                PtxError::parse(line, format!("call of undeclared function `{fname}`"))
            })?;
            let mut args = Vec::new();
            if self.eat_punct(',') {
                args = self.param_names(ctx, line)?;
            }
            self.expect_punct(';')?;
            if !ctx.calls.contains(&f) {
                ctx.calls.push(f);
            }
            let mut m = Mods::default();
            for p in &parts[1..] {
                if *p != "uni" {
                    ctx.unsupported
                        .push(PtxError::unimplemented(line, format!("`{opcode}`")));
                    return Ok(());
                }
                m.approx = false;
            }
            ctx.body.push(Inst {
                op: Op::Call,
                ty: Ty::B32,
                ty2: Ty::B32,
                m,
                guard,
                d: vec![Operand::Params(rets)],
                s: vec![Operand::Func(f), Operand::Params(args)],
                line,
            });
            return Ok(());
        }
        let mut label = None;
        if !self.eat_punct(';') {
            loop {
                if base == "bra" {
                    label = Some(self.word()?);
                } else {
                    ops.push(self.operand(ctx, line)?);
                }
                if self.eat_punct(';') {
                    break;
                }
                self.expect_punct(',')?;
            }
        }
        match decode(&parts, &opcode, ops, guard, line) {
            Ok(inst) => {
                let idx = ctx.body.len();
                ctx.body.push(inst);
                if let Some(l) = label {
                    ctx.body[idx].s.push(Operand::Label(u32::MAX));
                    ctx.fixups.push((idx, 0, l, line));
                }
            }
            Err(e) if e.kind == ErrorKind::Unimplemented => ctx.unsupported.push(e),
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

fn write_init(bytes: &mut [u8], ty: Ty, vals: &[Tok], line: u32) -> Result<()> {
    let sz = ty.size() as usize;
    if vals.len() * sz > bytes.len() {
        return Err(PtxError::parse(line, "too many initialiser values"));
    }
    for (i, v) in vals.iter().enumerate() {
        let bits: u64 = match (ty, v) {
            (
                Ty::F32,
                Tok::Float {
                    bits,
                    double: false,
                },
            ) => *bits,
            (Ty::F32, Tok::Float { bits, double: true }) => {
                (f64::from_bits(*bits) as f32).to_bits() as u64
            }
            (Ty::F64, Tok::Float { bits, double: true }) => *bits,
            (
                Ty::F64,
                Tok::Float {
                    bits,
                    double: false,
                },
            ) => (f32::from_bits(*bits as u32) as f64).to_bits(),
            (Ty::F32, Tok::Int(v)) => (*v as i64 as f32).to_bits() as u64,
            (Ty::F64, Tok::Int(v)) => (*v as i64 as f64).to_bits(),
            (_, Tok::Int(v)) if !ty.float() => *v,
            _ => {
                return Err(PtxError::unimplemented(
                    line,
                    format!("initialiser {v:?} for {ty:?}"),
                ))
            }
        };
        bytes[i * sz..(i + 1) * sz].copy_from_slice(&bits.to_le_bytes()[..sz]);
    }
    Ok(())
}

/// `ldmatrix`, `mma.sync` and `cp.async` forms; `None` when the form is not implemented.
fn decode_warp_async(
    parts: &[&str],
    ops: Vec<Operand>,
    guard: Option<(u32, bool)>,
    line: u32,
) -> Option<Result<Inst>> {
    let mut m = Mods {
        vec: 1,
        ..Mods::default()
    };
    let bad = |n: usize| {
        Some(Err(PtxError::parse(
            line,
            format!("`{}` takes {n} operands", parts.join(".")),
        )))
    };
    let mut ty2 = Ty::B16;
    let (op, ndst, nsrc): (Op, usize, &[usize]) = match parts {
        ["ldmatrix", "sync", "aligned", "m8n8", num, rest @ ..] => {
            m.vec = match *num {
                "x1" => 1,
                "x2" => 2,
                "x4" => 4,
                _ => return None,
            };
            match rest {
                ["trans", "shared", "b16"] => m.trans = true,
                ["shared", "b16"] => {}
                _ => return None,
            }
            (Op::Ldmatrix, 1, &[1])
        }
        ["mma", "sync", "aligned", "m16n8k16", "row", "col", "f32", a, b, "f32"] if a == b => {
            ty2 = match *a {
                "f16" => Ty::F16,
                "bf16" => Ty::Bf16,
                _ => return None,
            };
            (Op::Mma, 1, &[3])
        }
        ["cp", "async", "cg" | "ca", "shared", "global"] => (Op::CpAsync, 0, &[3, 4]),
        ["cp", "async", "commit_group"] => (Op::CpCommit, 0, &[0]),
        ["cp", "async", "wait_group"] => (Op::CpWait, 0, &[1]),
        ["cp", "async", "wait_all"] => (Op::CpWait, 0, &[0]),
        _ => return None,
    };
    if ops.len() < ndst || !nsrc.contains(&(ops.len() - ndst)) {
        return bad(ndst + nsrc[0]);
    }
    let mut s = ops;
    let d: Vec<Operand> = s.drain(..ndst).collect();
    Some(Ok(Inst {
        op,
        ty: Ty::B32,
        ty2,
        m,
        guard,
        d,
        s,
        line,
    }))
}

fn cmp_of(s: &str) -> Option<Cmp> {
    Some(match s {
        "eq" => Cmp::Eq,
        "ne" => Cmp::Ne,
        "lt" => Cmp::Lt,
        "le" => Cmp::Le,
        "gt" => Cmp::Gt,
        "ge" => Cmp::Ge,
        "lo" => Cmp::Lo,
        "ls" => Cmp::Ls,
        "hi" => Cmp::Hi,
        "hs" => Cmp::Hs,
        "equ" => Cmp::Equ,
        "neu" => Cmp::Neu,
        "ltu" => Cmp::Ltu,
        "leu" => Cmp::Leu,
        "gtu" => Cmp::Gtu,
        "geu" => Cmp::Geu,
        "num" => Cmp::Num,
        "nan" => Cmp::Nan,
        _ => return None,
    })
}

/// Turns an opcode with its modifiers and operands into an instruction, or an
/// `Unimplemented` error naming the opcode.
/// The operation named by an `atom`/`red` qualifier.
fn atom_op(s: &str) -> Option<AtomOp> {
    Some(match s {
        "add" => AtomOp::Add,
        "exch" => AtomOp::Exch,
        "cas" => AtomOp::Cas,
        "min" => AtomOp::Min,
        "max" => AtomOp::Max,
        "inc" => AtomOp::Inc,
        "dec" => AtomOp::Dec,
        "and" => AtomOp::And,
        "or" => AtomOp::Or,
        "xor" => AtomOp::Xor,
        _ => return None,
    })
}

/// Whether the executor implements this `atom`/`red` operation and type (`red` has no `cas`
/// or `exch`; `.noftz` goes with the packed half types only, which it requires).
fn atom_ok(op: Op, a: Option<AtomOp>, ty: Ty, parts: &[&str]) -> bool {
    use AtomOp::*;
    let noftz = parts.contains(&"noftz");
    let Some(a) = a else { return false };
    if op == Op::Red && matches!(a, Cas | Exch) {
        return false;
    }
    if noftz != matches!(ty, Ty::F16x2 | Ty::Bf16x2) {
        return false;
    }
    match a {
        Add => matches!(
            ty,
            Ty::U32 | Ty::S32 | Ty::U64 | Ty::F32 | Ty::F64 | Ty::F16x2 | Ty::Bf16x2
        ),
        Min | Max => matches!(ty, Ty::U32 | Ty::S32 | Ty::U64 | Ty::S64),
        Inc | Dec => ty == Ty::U32,
        // Bitwise: the ISA names `.b32`/`.b64`; same-sized integer types mean the same.
        And | Or | Xor | Exch | Cas => {
            matches!(
                ty,
                Ty::B32 | Ty::B64 | Ty::U32 | Ty::U64 | Ty::S32 | Ty::S64
            )
        }
    }
}

fn decode(
    parts: &[&str],
    opcode: &str,
    ops: Vec<Operand>,
    guard: Option<(u32, bool)>,
    line: u32,
) -> Result<Inst> {
    let unimpl = || PtxError::unimplemented(line, format!("`{opcode}`"));
    if matches!(parts[0], "ldmatrix" | "mma" | "cp") {
        return decode_warp_async(parts, ops, guard, line).ok_or_else(unimpl)?;
    }
    let op = match parts[0] {
        "add" => Op::Add,
        "sub" => Op::Sub,
        "mul" => Op::Mul,
        "mad" => Op::Mad,
        "fma" => Op::Fma,
        "div" => Op::Div,
        "rem" => Op::Rem,
        "min" => Op::Min,
        "max" => Op::Max,
        "abs" => Op::Abs,
        "neg" => Op::Neg,
        "not" => Op::Not,
        "and" => Op::And,
        "or" => Op::Or,
        "xor" => Op::Xor,
        "shl" => Op::Shl,
        "shr" => Op::Shr,
        "addc" => Op::Addc,
        "subc" => Op::Subc,
        "madc" => Op::Madc,
        "bfi" => Op::Bfi,
        "bfe" => Op::Bfe,
        "clz" => Op::Clz,
        "popc" => Op::Popc,
        "brev" => Op::Brev,
        "setp" => Op::Setp,
        "selp" => Op::Selp,
        "mov" => Op::Mov,
        "cvt" => Op::Cvt,
        "cvta" => Op::Cvta,
        "ld" => Op::Ld,
        "st" => Op::St,
        "bar" | "barrier" => Op::Bar,
        "shfl" => Op::Shfl,
        "bra" => Op::Bra,
        "ret" => Op::Ret,
        "exit" => Op::Exit,
        "rcp" => Op::Rcp,
        "sqrt" => Op::Sqrt,
        "rsqrt" => Op::Rsqrt,
        "ex2" => Op::Ex2,
        "lg2" => Op::Lg2,
        "sin" => Op::Sin,
        "cos" => Op::Cos,
        "tanh" => Op::Tanh,
        "copysign" => Op::Copysign,
        "atom" => Op::Atom,
        "red" => Op::Red,
        _ => return Err(unimpl()),
    };
    let mut m = Mods {
        vec: 1,
        ..Mods::default()
    };
    let mut tys = Vec::new();
    for &p in &parts[1..] {
        if let Some(t) = Ty::from_name(p) {
            tys.push(t);
            continue;
        }
        let atomic = matches!(op, Op::Atom | Op::Red);
        match (op, p) {
            (Op::Atom | Op::Red, o) if atom_op(o).is_some() && m.atom.is_none() => {
                m.atom = atom_op(o)
            }
            (Op::Atom | Op::Red, "global") => m.space = Some(Space::Global),
            (Op::Atom | Op::Red, "shared" | "shared::cta") => m.space = Some(Space::Shared),
            // Memory-order and scope qualifiers: every atomic is sequentially applied here.
            (Op::Atom | Op::Red, "relaxed" | "acquire" | "release" | "acq_rel") => {}
            (Op::Atom | Op::Red, "cta" | "gpu" | "sys" | "cluster") => {}
            (Op::Atom | Op::Red, "noftz") => m.ftz = false,
            _ if atomic => return Err(unimpl()),
            (Op::Setp, c) if cmp_of(c).is_some() && m.cmp.is_none() => m.cmp = cmp_of(c),
            (Op::Setp, "and") => m.bool_op = Some(BoolOp::And),
            (Op::Setp, "or") => m.bool_op = Some(BoolOp::Or),
            (Op::Setp, "xor") => m.bool_op = Some(BoolOp::Xor),
            (Op::Shfl, "up") => m.shfl = Some(ShflMode::Up),
            (Op::Shfl, "down") => m.shfl = Some(ShflMode::Down),
            (Op::Shfl, "bfly") => m.shfl = Some(ShflMode::Bfly),
            (Op::Shfl, "idx") => m.shfl = Some(ShflMode::Idx),
            (Op::Shfl | Op::Bar, "sync") => {}
            (Op::Bra | Op::Ret, "uni") => {}
            (_, "rn" | "rni") => m.round = Round::Rn,
            (_, "rz" | "rzi") => m.round = Round::Rz,
            (_, "rm" | "rmi") => m.round = Round::Rm,
            (_, "rp" | "rpi") => m.round = Round::Rp,
            (_, "ftz") => m.ftz = true,
            (_, "sat") => m.sat = true,
            (_, "approx" | "full") => m.approx = true,
            (_, "cc") => m.cc = true,
            (Op::Mul | Op::Mad | Op::Madc, "lo") => m.mul = MulMode::Lo,
            (Op::Mul | Op::Mad | Op::Madc, "hi") => m.mul = MulMode::Hi,
            (Op::Mul | Op::Mad, "wide") => m.mul = MulMode::Wide,
            (Op::Ld | Op::St | Op::Cvta, "global") => m.space = Some(Space::Global),
            (Op::Ld | Op::St | Op::Cvta, "shared") => m.space = Some(Space::Shared),
            (Op::Ld | Op::St | Op::Cvta, "local") => m.space = Some(Space::Local),
            (Op::Ld | Op::St, "param") => m.space = Some(Space::Param),
            (Op::Ld | Op::Cvta, "const") => m.space = Some(Space::Const),
            (Op::Cvta, "to") => m.to = true,
            (Op::Ld, "nc") => {}
            (Op::Ld | Op::St, "ca" | "cg" | "cs" | "lu" | "cv" | "wb" | "wt") => {}
            (Op::Ld | Op::St, "v2") => m.vec = 2,
            (Op::Ld | Op::St, "v4") => m.vec = 4,
            _ => return Err(unimpl()),
        }
    }
    let (ty, ty2) = match (op, tys.as_slice()) {
        (Op::Bra | Op::Ret | Op::Exit | Op::Bar, []) => (Ty::B32, Ty::B32),
        (Op::Cvt, [d, s]) => (*d, *s),
        (Op::Cvt, [d]) if *d == Ty::F32 && m.sat => (Ty::F32, Ty::F32),
        (Op::Clz | Op::Popc, [t]) => (Ty::U32, *t),
        (Op::Cvta, [t]) => (*t, *t),
        (Op::Setp, [t]) => (Ty::Pred, *t),
        (Op::Copysign, [t]) => (*t, *t),
        (_, [t]) => (*t, *t),
        _ => return Err(unimpl()),
    };
    if matches!(op, Op::Atom | Op::Red) && !atom_ok(op, m.atom, ty, parts) {
        return Err(unimpl());
    }
    // Shapes the executor relies on.
    let mut d = Vec::new();
    let mut s = ops;
    let ndst = match op {
        Op::St | Op::Red | Op::Bra | Op::Ret | Op::Exit | Op::Bar => 0,
        _ => 1,
    };
    if s.len() < ndst {
        return Err(PtxError::parse(
            line,
            format!("`{opcode}` needs a destination"),
        ));
    }
    d.extend(s.drain(..ndst));
    let want = match op {
        Op::Ret | Op::Exit => 0,
        Op::Bra => 0,
        Op::Cvt if matches!(ty, Ty::F16x2 | Ty::Bf16x2) => 2,
        Op::Bar => 1,
        Op::Abs
        | Op::Neg
        | Op::Not
        | Op::Mov
        | Op::Cvt
        | Op::Cvta
        | Op::Clz
        | Op::Popc
        | Op::Brev
        | Op::Rcp
        | Op::Sqrt
        | Op::Rsqrt
        | Op::Ex2
        | Op::Lg2
        | Op::Sin
        | Op::Cos
        | Op::Tanh
        | Op::Ld => 1,
        Op::Mad | Op::Fma | Op::Madc | Op::Selp | Op::Bfe => 3,
        Op::Bfi => 4,
        Op::Shfl => 4,
        Op::Setp if m.bool_op.is_some() => 3,
        Op::Setp => 2,
        Op::St => 2,
        Op::Atom if m.atom == Some(AtomOp::Cas) => 3,
        _ => 2,
    };
    // `bar.sync a{, b}`: an optional thread count.
    let bar_count = op == Op::Bar && s.len() == 2;
    if s.len() != want && !bar_count {
        return Err(PtxError::parse(
            line,
            format!(
                "`{opcode}` takes {} operands, found {}",
                want + ndst,
                s.len() + ndst
            ),
        ));
    }
    // Checks on what the executor implements.
    let float_ok = |t: Ty| matches!(t, Ty::F32 | Ty::F64);
    let half = matches!(ty, Ty::F16 | Ty::F16x2);
    match op {
        // f16 / f16x2 arithmetic: add, sub, mul, fma, round to nearest only.
        Op::Add | Op::Sub | Op::Mul | Op::Fma
            if half && (!matches!(m.round, Round::Rn | Round::None) || m.approx) =>
        {
            return Err(unimpl())
        }
        Op::Add | Op::Sub | Op::Mul | Op::Fma if half => {}
        Op::Add | Op::Sub | Op::Mul | Op::Fma | Op::Div | Op::Min | Op::Max | Op::Abs | Op::Neg
            if ty.float() && !float_ok(ty) =>
        {
            return Err(unimpl())
        }
        Op::Fma if !ty.float() => return Err(unimpl()),
        // f64 fma needs an explicit rounding (the ISA requires one).
        Op::Fma if ty == Ty::F64 && m.round == Round::None => return Err(unimpl()),
        Op::Mad if ty.float() => return Err(unimpl()),
        Op::Rcp | Op::Sqrt | Op::Rsqrt | Op::Ex2 | Op::Lg2 | Op::Sin | Op::Cos | Op::Tanh
            if !float_ok(ty) =>
        {
            return Err(unimpl())
        }
        Op::Shfl if ty != Ty::B32 || m.shfl.is_none() => return Err(unimpl()),
        Op::Setp if m.cmp.is_none() => return Err(unimpl()),
        Op::Add | Op::Sub if m.sat && !(ty == Ty::S32 || ty.float()) => return Err(unimpl()),
        Op::Mul | Op::Mad if m.sat => return Err(unimpl()),
        _ => {}
    }
    if op == Op::Cvt && !super::ops::cvt::check(ty, ty2, &m) {
        return Err(unimpl());
    }
    Ok(Inst {
        op,
        ty,
        ty2,
        m,
        guard,
        d,
        s,
        line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_registers_shadow_outer_ones() {
        let src = ".version 8.4\n.target sm_80\n.address_size 64\n.visible .entry k(.param .u64 k_p)\n{\n.reg .b32 %r<3>;\nmov.u32 %r1, 1;\n{\n.reg .b32 %r1;\nmov.u32 %r1, 2;\n}\nmov.u32 %r2, %r1;\nret;\n}\n";
        let m = parse_module(src).unwrap();
        let body = m.functions[0].body.as_ref().unwrap();
        assert_eq!(body[0].d[0], Operand::Reg(1));
        assert_eq!(body[1].d[0], Operand::Reg(3));
        assert_eq!(body[2].s[0], Operand::Reg(1));
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse_module(".version 8.4\n.visible .entry k()\n{\nfoo.bar %r1;\n}").unwrap_err();
        assert!(e.message.contains("line 4"), "{e}");
        let m = parse_module(
            ".version 8.4\n.visible .entry k()\n{\n.reg .b32 %r<2>;\nfrob.b32 %r1, %r0;\nret;\n}",
        )
        .unwrap();
        let e = &m.functions[0].unsupported[0];
        assert!(
            e.message.contains("line 5") && e.message.contains("frob.b32"),
            "{e}"
        );
        let e =
            parse_module(".version 8.4\n.visible .entry k()\n{\nmov.u32 %r9, 1;\n}").unwrap_err();
        assert!(e.message.contains("unknown register `%r9`"), "{e}");
    }
}
