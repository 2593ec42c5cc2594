import sys; sys.path.insert(0, '/tmp/qref')
from ref import *
import struct
def q40_row_impl(x, qw):
    n = len(x); s2 = F(0)
    for v in x: s2 = s2 + v*v
    sigma2 = s2/F(n); out = b''
    for ib in range(n//32):
        xb = x[32*ib:32*ib+32]; w = [qw[32*ib+j]*np.sqrt(sigma2 + xb[j]*xb[j]) for j in range(32)]
        d, L = make_qx_quants(32, 8, xb, 1, w)
        out += h(d).to_bytes(2,'little') + bytes([L[j] | (L[j+16] << 4) for j in range(16)])
    return out
def q50_row_impl(x, qw):
    n = len(x); s2 = F(0)
    for v in x: s2 = s2 + v*v
    sigma2 = s2/F(n); out = b''
    for ib in range(n//32):
        xb = x[32*ib:32*ib+32]; w = [qw[32*ib+j]*np.sqrt(sigma2 + xb[j]*xb[j]) for j in range(32)]
        d, L = make_qx_quants(32, 16, xb, 1, w)
        qh = 0
        for j in range(32): qh |= ((L[j] >> 4) & 1) << j
        out += h(d).to_bytes(2,'little') + qh.to_bytes(4,'little') + bytes([(L[j] & 15) | ((L[j+16] & 15) << 4) for j in range(16)])
    return out
def q41_51_row_impl(x, qw, nmax):
    n = len(x); s2 = F(0)
    for v in x: s2 = s2 + v*v
    sigma2 = s2/F(n); out = b''
    for ib in range(n//32):
        xb = x[32*ib:32*ib+32]; w = [qw[32*ib+j]*np.sqrt(sigma2 + xb[j]*xb[j]) for j in range(32)]
        d, the_min, L = make_qkx_quants(32, nmax, xb, w, -0.9, 0.05, 36, False, v3=True)
        out += h(d).to_bytes(2,'little') + h(-the_min).to_bytes(2,'little')
        if nmax == 31:
            qh = 0
            for j in range(32): qh |= ((L[j] >> 4) & 1) << j
            out += qh.to_bytes(4,'little')
        out += bytes([(L[j] & 15) | ((L[j+16] & 15) << 4) for j in range(16)])
    return out
