# scalar float32 re-implementation of ggml K-quant encoders, written from the reading of ggml-quants.c
import numpy as np, ctypes
F = np.float32
def nearest_int(f):
    v = np.array([F(f) + F(12582912.0)], dtype=np.float32).view(np.int32)[0]
    return int((int(v) & 0x007fffff) - 0x00400000)
def h(f):  # fp32->fp16 bits
    return int(np.array([f], np.float32).astype(np.float16).view(np.uint16)[0])
def hf(b): return F(np.array([b], np.uint16).view(np.float16)[0])
EPS = F(1e-15)

def make_qx_quants(n, nmax, x, rmse_type, qw):
    L = [0]*n
    mx = F(0); amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax: amax = ax; mx = x[i]
    if amax < EPS: return F(0), [0]*n
    iscale = F(-nmax) / mx
    def w_of(i):
        if qw is not None: return qw[i]
        return x[i]*x[i]  # rmse_type 1
    sumlx = F(0); suml2 = F(0)
    for i in range(n):
        l = nearest_int(iscale*x[i]); l = max(-nmax, min(nmax-1, l)); L[i] = l + nmax
        w = w_of(i)
        sumlx = sumlx + w*x[i]*F(l); suml2 = suml2 + w*F(l)*F(l)
    scale = sumlx/suml2 if suml2 != 0 else F(0)
    best = scale*sumlx
    for is_ in range(-9, 10):
        if is_ == 0: continue
        iscale = -(F(nmax) + F(0.1)*F(is_)) / mx
        sumlx = F(0); suml2 = F(0)
        for i in range(n):
            l = nearest_int(iscale*x[i]); l = max(-nmax, min(nmax-1, l))
            w = w_of(i)
            sumlx = sumlx + w*x[i]*F(l); suml2 = suml2 + w*F(l)*F(l)
        if suml2 > 0 and sumlx*sumlx > best*suml2:
            for i in range(n):
                l = nearest_int(iscale*x[i]); L[i] = nmax + max(-nmax, min(nmax-1, l))
            scale = sumlx/suml2; best = scale*sumlx
    return scale, L

def make_q3_quants(n, nmax, x):
    mx = F(0); amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax: amax = ax; mx = x[i]
    if amax < EPS: return F(0), [0]*n
    iscale = F(-nmax)/mx
    L = [0]*n; sumlx = F(0); suml2 = F(0)
    for i in range(n):
        l = nearest_int(iscale*x[i]); l = max(-nmax, min(nmax-1, l)); L[i] = l
        w = x[i]*x[i]; sumlx = sumlx + w*x[i]*F(l); suml2 = suml2 + w*F(l)*F(l)
    for itry in range(5):
        nch = 0
        for i in range(n):
            w = x[i]*x[i]
            slx = sumlx - w*x[i]*F(L[i])
            if slx > 0:
                sl2 = suml2 - w*F(L[i])*F(L[i])
                nl = nearest_int(x[i]*sl2/slx); nl = max(-nmax, min(nmax-1, nl))
                if nl != L[i]:
                    slx = slx + w*x[i]*F(nl); sl2 = sl2 + w*F(nl)*F(nl)
                    if sl2 > 0 and slx*slx*suml2 > sumlx*sumlx*sl2:
                        L[i] = nl; sumlx = slx; suml2 = sl2; nch += 1
        if not nch: break
    return (sumlx/suml2 if suml2 > 0 else F(0)), [l+nmax for l in L]

def make_qkx_quants(n, nmax, x, weights, rmin, rdelta, nstep, use_mad, v3=False):
    mn = x[0]; mx = x[0]; sum_w = weights[0]; sum_x = sum_w*x[0]
    for i in range(1, n):
        if x[i] < mn: mn = x[i]
        if x[i] > mx: mx = x[i]
        w = weights[i]; sum_w = sum_w + w; sum_x = sum_x + w*x[i]
    if mn > 0: mn = F(0)
    if (mx <= mn) if v3 else (mx == mn): return F(0), -mn, [0]*n
    iscale = F(nmax)/(mx - mn); scale = F(1)/iscale
    L = [0]*n; best = F(0)
    for i in range(n):
        l = nearest_int(iscale*(x[i]-mn)); L[i] = max(0, min(nmax, l))
        diff = scale*F(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff*diff
        best = best + weights[i]*diff
    for is_ in range(nstep+1):
        iscale = (F(rmin) + F(rdelta)*F(is_) + F(nmax))/(mx - mn)
        sl = F(0); sl2 = F(0); sxl = F(0); La = [0]*n
        for i in range(n):
            l = nearest_int(iscale*(x[i]-mn)); l = max(0, min(nmax, l)); La[i] = l
            w = weights[i]; sl = sl + w*F(l); sl2 = sl2 + w*F(l)*F(l); sxl = sxl + w*F(l)*x[i]
        D = sum_w*sl2 - sl*sl
        if D > 0:
            ts = (sum_w*sxl - sum_x*sl)/D
            tm = (sl2*sum_x - sl*sxl)/D
            if tm > 0: tm = F(0); ts = sxl/sl2
            cur = F(0)
            for i in range(n):
                diff = ts*F(La[i]) + tm - x[i]
                diff = abs(diff) if use_mad else diff*diff
                cur = cur + weights[i]*diff
            if cur < best:
                L = La; best = cur; scale = ts; mn = tm
    return scale, -mn, L

def make_qp_quants(n, nmax, x, qw):
    mx = F(0)
    for i in range(n): mx = max(mx, x[i])
    if mx < EPS: return F(0), [0]*n
    iscale = F(nmax)/mx
    L = [nearest_int(iscale*x[i]) for i in range(n)]
    scale = F(1)/iscale; best = F(0)
    for i in range(n):
        diff = x[i] - scale*F(L[i]); best = best + qw[i]*diff*diff
    for is_ in range(-4, 5):
        if is_ == 0: continue
        isc = (F(0.1)*F(is_) + F(nmax))/mx; sc = F(1)/isc; mse = F(0)
        for i in range(n):
            l = min(nmax, nearest_int(isc*x[i])); diff = x[i] - sc*F(l); mse = mse + qw[i]*diff*diff
        if mse < best: best = mse; iscale = isc
    sumlx = F(0); suml2 = F(0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale*x[i])); L[i] = l
        w = qw[i]; sumlx = sumlx + w*x[i]*F(l); suml2 = suml2 + w*F(l)*F(l)
    for itry in range(5):
        nch = 0
        for i in range(n):
            w = qw[i]
            slx = sumlx - w*x[i]*F(L[i]); sl2 = suml2 - w*F(L[i])*F(L[i])
            if slx > 0 and sl2 > 0:
                nl = min(nmax, nearest_int(x[i]*sl2/slx))
                if nl != L[i]:
                    slx = slx + w*x[i]*F(nl); sl2 = sl2 + w*F(nl)*F(nl)
                    if slx*slx*suml2 > sumlx*sumlx*sl2:
                        L[i] = nl; sumlx = slx; suml2 = sl2; nch += 1
        if not nch: break
    return (sumlx/suml2 if suml2 > 0 else F(0)), L

def pack_k4(ls, lm):
    s = [0]*12
    for j in range(8):
        if j < 4: s[j] = ls[j]; s[j+4] = lm[j]
        else:
            s[j+4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            s[j-4] |= (ls[j] >> 4) << 6
            s[j] |= (lm[j] >> 4) << 6
    return s
def get_scale_min_k4(j, q):
    if j < 4: return q[j] & 63, q[j+4] & 63
    return (q[j+4] & 0xF) | ((q[j-4] >> 6) << 4), (q[j+4] >> 4) | ((q[j] >> 6) << 4)

def q45K_block(x, nmax, qw=None):
    # returns bytes of one q4_K (nmax=15) or q5_K (nmax=31) block
    scales = [F(0)]*8; mins = [F(0)]*8; L = [0]*256
    if qw is None:
        for j in range(8):
            xs = x[32*j:32*j+32]
            s2 = F(0)
            for l in range(32): s2 = s2 + xs[l]*xs[l]
            av = np.sqrt(s2/F(32))
            w = [av + abs(v) for v in xs]
            if nmax == 15: sc, mn, Lj = make_qkx_quants(32, 15, xs, w, -1.0, 0.1, 20, False)
            else:          sc, mn, Lj = make_qkx_quants(32, 31, xs, w, -0.5, 0.1, 15, False)
            scales[j] = sc; mins[j] = mn; L[32*j:32*j+32] = Lj
        max_scale = F(0); max_min = F(0)
        for j in range(8):
            if scales[j] > max_scale: max_scale = scales[j]
            if mins[j] > max_min: max_min = mins[j]
        inv_s = F(63)/max_scale if max_scale > 0 else F(0)
        inv_m = F(63)/max_min if max_min > 0 else F(0)
        ls = [min(63, nearest_int(inv_s*scales[j]) & 0xFF) for j in range(8)]
        lm = [min(63, nearest_int(inv_m*mins[j]) & 0xFF) for j in range(8)]
        d = h(max_scale/F(63)); dmin = h(max_min/F(63))
    else:
        s2 = F(0)
        for l in range(256): s2 = s2 + x[l]*x[l]
        sigma2 = F(2)*s2/F(256)
        sw = [F(0)]*8
        for j in range(8):
            xs = x[32*j:32*j+32]
            w = [qw[32*j+l]*np.sqrt(sigma2 + xs[l]*xs[l]) for l in range(32)]
            s = F(0)
            for l in range(32): s = s + w[l]
            sw[j] = s
            sc, mn, Lj = make_qkx_quants(32, nmax, xs, w, -0.9, 0.05, 36, False, v3=True)
            scales[j] = sc; mins[j] = mn; L[32*j:32*j+32] = Lj
        db, ls = make_qp_quants(8, 63, scales, sw)
        mb, lm = make_qp_quants(8, 63, mins, sw)
        ls = [min(63, v & 0xFF) for v in ls]; lm = [min(63, v & 0xFF) for v in lm]
        d = h(db); dmin = h(mb)
    sc12 = pack_k4(ls, lm)
    for j in range(8):
        sc, m = get_scale_min_k4(j, sc12)
        dd = hf(d)*F(sc)
        if dd == 0: continue
        dm = hf(dmin)*F(m)
        for ii in range(32):
            l = nearest_int((x[32*j+ii] + dm)/dd); L[32*j+ii] = max(0, min(nmax, l))
    out = bytearray()
    out += d.to_bytes(2, 'little') + dmin.to_bytes(2, 'little') + bytes(sc12)
    if nmax == 15:
        for j in range(0, 256, 64):
            out += bytes([L[j+l] | (L[j+l+32] << 4) for l in range(32)])
    else:
        qh = [0]*32
        for e in range(256):
            if L[e] > 15: qh[e % 32] |= 1 << (e // 32)
        out += bytes(qh)
        for j in range(0, 256, 64):
            out += bytes([(L[j+l] & 15) | ((L[j+l+32] & 15) << 4) for l in range(32)])
    return bytes(out)

def q6K_block(x, qw=None):
    scales = [F(0)]*16; L = [0]*256
    max_scale = F(0); max_abs = F(0)
    for ib in range(16):
        sc, Lb = make_qx_quants(16, 32, x[16*ib:16*ib+16], 1, None if qw is None else qw[16*ib:16*ib+16])
        scales[ib] = sc; L[16*ib:16*ib+16] = Lb
        if abs(sc) > max_abs: max_abs = abs(sc); max_scale = sc
    if max_abs < EPS: return bytes(210)
    iscale = F(-128)/max_scale
    d = h(F(1)/iscale)
    sc8 = [min(127, nearest_int(iscale*scales[ib])) for ib in range(16)]
    for j in range(16):
        dd = hf(d)*F(sc8[j])
        if dd == 0: continue
        for ii in range(16):
            l = nearest_int(x[16*j+ii]/dd); L[16*j+ii] = max(-32, min(31, l)) + 32
    ql = [0]*128; qh = [0]*64
    for hh, j in enumerate(range(0, 256, 128)):
        for l in range(32):
            ql[64*hh+l] = (L[j+l] & 15) | ((L[j+l+64] & 15) << 4)
            ql[64*hh+l+32] = (L[j+l+32] & 15) | ((L[j+l+96] & 15) << 4)
            qh[32*hh+l] = (L[j+l] >> 4) | ((L[j+l+32] >> 4) << 2) | ((L[j+l+64] >> 4) << 4) | ((L[j+l+96] >> 4) << 6)
    return bytes(ql) + bytes(qh) + bytes([v & 0xFF for v in sc8]) + d.to_bytes(2, 'little')

def pack_q3_scales(ls):  # ls already offset (0..63)
    s = [0]*12
    for j in range(16):
        l = ls[j]
        if j < 8: s[j] = l & 0xF
        else: s[j-8] |= (l & 0xF) << 4
        s[8 + j % 4] |= (l >> 4) << (2*(j//4))
    return s

def q3K_block(x, qw=None):
    L = [0]*256; scales = [F(0)]*16
    if qw is None:
        max_scale = F(0); amax = F(0)
        for j in range(16):
            sc, Lj = make_q3_quants(16, 4, x[16*j:16*j+16]); scales[j] = sc; L[16*j:16*j+16] = Lj
            if abs(sc) > amax: amax = abs(sc); max_scale = sc
        if max_scale != 0:
            iscale = F(-32)/max_scale
            ls = []
            for j in range(16):
                l = nearest_int(iscale*scales[j]); l = ((l + 128) & 0xFF) - 128  # int8_t store
                ls.append(max(-32, min(31, l)) + 32)
            s12 = pack_q3_scales(ls); d = h(F(1)/iscale)
        else:
            s12 = [0]*12; d = 0
    else:
        s2 = F(0)
        for l in range(256): s2 = s2 + x[l]*x[l]
        sigma2 = F(2)*s2/F(256); sw = [F(0)]*16
        for j in range(16):
            xs = x[16*j:16*j+16]
            w = [qw[16*j+l]*np.sqrt(sigma2 + xs[l]*xs[l]) for l in range(16)]
            s = F(0)
            for l in range(16): s = s + w[l]
            sw[j] = s
            sc, Lj = make_qx_quants(16, 4, xs, 1, w); scales[j] = sc; L[16*j:16*j+16] = Lj
        db, Ls = make_qx_quants(16, 32, scales, 1, sw)
        s12 = pack_q3_scales(Ls); d = h(db)
    for j in range(16):
        sc = (s12[j] & 0xF) if j < 8 else (s12[j-8] >> 4)
        sc = (sc | (((s12[8 + j % 4] >> (2*(j//4))) & 3) << 4)) - 32
        dd = hf(d)*F(sc)
        if dd == 0: continue
        for ii in range(16):
            l = nearest_int(x[16*j+ii]/dd); L[16*j+ii] = max(-4, min(3, l)) + 4
    hm = [0]*32
    for e in range(256):
        if L[e] > 3: hm[e % 32] |= 1 << (e // 32); L[e] -= 4
    qs = []
    for j in range(0, 256, 128):
        qs += [L[j+l] | (L[j+l+32] << 2) | (L[j+l+64] << 4) | (L[j+l+96] << 6) for l in range(32)]
    return bytes(hm) + bytes(qs) + bytes(s12) + d.to_bytes(2, 'little')

def q2K_block(x, qw=None):
    L = [0]*256; scales = [F(0)]*16; mins = [F(0)]*16
    if qw is None:
        max_scale = F(0); max_min = F(0)
        for j in range(16):
            xs = x[16*j:16*j+16]
            sc, mn, Lj = make_qkx_quants(16, 3, xs, [abs(v) for v in xs], -0.5, 0.1, 15, True)
            scales[j] = sc; mins[j] = mn; L[16*j:16*j+16] = Lj
            if sc > max_scale: max_scale = sc
            if mn > max_min: max_min = mn
        sb = [0]*16
        if max_scale > 0:
            isc = F(15)/max_scale
            sb = [nearest_int(isc*scales[j]) & 0xFF for j in range(16)]
            d = h(max_scale/F(15))
        else: d = h(F(0))
        if max_min > 0:
            isc = F(15)/max_min
            sb = [(sb[j] | (nearest_int(isc*mins[j]) << 4)) & 0xFF for j in range(16)]
            dmin = h(max_min/F(15))
        else: dmin = h(F(0))
    else:
        s2 = F(0)
        for l in range(256): s2 = s2 + x[l]*x[l]
        sigma2 = s2/F(256); sw = [F(0)]*16
        for j in range(16):
            xs = x[16*j:16*j+16]
            w = [qw[16*j+l]*np.sqrt(sigma2 + xs[l]*xs[l]) for l in range(16)]
            s = F(0)
            for l in range(16): s = s + w[l]
            sw[j] = s
            sc, mn, Lj = make_qkx_quants(16, 3, xs, w, -0.9, 0.05, 36, False, v3=True)
            scales[j] = sc; mins[j] = mn; L[16*j:16*j+16] = Lj
        dm, Ls = make_qp_quants(16, 15, scales, sw)
        mm, Lm = make_qp_quants(16, 15, mins, sw)
        d = h(dm); dmin = h(mm)
        sb = [(Ls[j] | (Lm[j] << 4)) & 0xFF for j in range(16)]
    for j in range(16):
        dd = hf(d)*F(sb[j] & 0xF)
        if dd == 0: continue
        m = hf(dmin)*F(sb[j] >> 4)
        for ii in range(16):
            l = nearest_int((x[16*j+ii] + m)/dd); L[16*j+ii] = max(0, min(3, l))
    qs = []
    for j in range(0, 256, 128):
        qs += [L[j+l] | (L[j+l+32] << 2) | (L[j+l+64] << 4) | (L[j+l+96] << 6) for l in range(32)]
    return bytes(sb) + bytes(qs) + d.to_bytes(2, 'little') + dmin.to_bytes(2, 'little')
