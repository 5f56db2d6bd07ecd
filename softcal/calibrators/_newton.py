"""Newton's method for the linear calibrators (vector scaling, matrix scaling, Dirichlet), in
float64, with the Hessian used through its structure.

The model. Features phi_i (C,) of a row (its logits, or its log-probabilities for Dirichlet
calibration), calibrated logits z_i = A(theta) phi_i + b, p_i = softmax(z_i), and the objective

    F(theta) = (1 / sum_i w_i) sum_i w_i [logsumexp(z_i) - z_i,y_i]  +  R(theta)

(w_i: row weights, 1, or 0/1 masks for the folds of cross-validation; R: ODIR, see below).
With r_i = p_i - e_y_i and D_i = diag(p_i) - p_i p_i^T the row's gradient and Hessian in z are
r_i and D_i, so for matrix scaling (theta = [W | b], C x d with d = C + 1 and u_i = [phi_i, 1]):

    grad = sum_i w_i r_i u_i^T                       (C x d: one matmul)
    H    = sum_i w_i D_i (x) u_i u_i^T                (Kronecker blocks, never formed per row)
         = blockdiag_c( U^T diag(w p_c) U )  -  M^T M,   M[i, (c, j)] = sqrt(w_i) p_ic u_ij
    H V  = T^T U,  T = w * (p * S - p * rowsum(p * S)),  S = U V^T  (two matmuls, O(N C d))

and for vector scaling (theta = (a, b), z = a * phi + b) the 2C x 2C Hessian has the blocks
diag(sum w p phi^2) - (p phi)^T (p phi), ... (O(N C^2)).

Solver. Small problems (P = number of parameters <= ``dense_max``) form H (float64, the two
terms above: O(N P^2 / C) flops) and take exact Newton steps (Cholesky of H plus a tiny ridge:
without regularisation H is singular along the softmax's invariance, theta -> theta + 1 v^T,
and the gradient is orthogonal to that null space, so the ridge only picks the minimum-norm
step). Large problems (matrix scaling with C in the hundreds) take truncated Newton steps:
preconditioned conjugate gradients on H s = -g with the Hessian-vector product above (the
cached p_i: two matmuls per CG iteration), the preconditioner block c being alpha_c U^T diag(w
omega) U plus the regulariser's diagonal (one d x d Gram matrix per Newton iteration, C small
Cholesky factors), stopped by the Eisenstat-Walker forcing term. Either way a backtracking
(Armijo) line search guards the step, and the iteration stops when max |grad F| <= tol.

ODIR (Kull et al. 2019): R = lam / (C (C - 1)) sum_{i != j} W_ij^2 + mu / C sum_j b_j^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ._base import Rows

LOG_EPS = math.log(torch.finfo(torch.float64).eps)  # Dirichlet features: log p clamped here
DENSE_MAX = 1500  # at most this many parameters: dense Hessian; more: truncated Newton (CG)


def features(kind: str, x: torch.Tensor) -> torch.Tensor:
    """phi(x) (n, C) float64: the logits ("logits") or the log-probabilities clamped at
    log(eps) ("logprobs", Kull et al.'s Dirichlet calibration)."""
    if kind == "logprobs":
        return torch.log_softmax(x, dim=1).clamp_min(LOG_EPS)
    return x


class Model:
    """A parametrisation: theta (flat float64) -> calibrated logits, and the derivatives."""

    kind = "matrix"

    def __init__(self, classes: int, feature: str, lam: float = 0.0, mu: float = 0.0,
                 l2: float = 0.0) -> None:
        self.c = classes
        self.feature = feature
        self.lam = float(lam)
        self.mu = float(mu)
        self.l2 = float(l2)  # + l2 * sum W_ij^2 over every entry of W (not b): scikit-learn's penalty

    # --- subclasses
    @property
    def size(self) -> int:
        raise NotImplementedError

    def z(self, phi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad(self, phi: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hess(self, phi: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hvp(self, phi: torch.Tensor, p: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reg_diag(self) -> torch.Tensor:
        """The regulariser's (diagonal) Hessian, flat (P,)."""
        raise NotImplementedError

    def identity(self, temperature: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    # --- shared
    def reg(self, theta: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """(R(theta), grad R) with R = 0.5 theta^T diag(reg_diag) theta."""
        d = self.reg_diag().to(theta)
        return float(0.5 * (d * theta * theta).sum()), d * theta


class MatrixModel(Model):
    kind = "matrix"

    @property
    def size(self) -> int:
        return self.c * (self.c + 1)

    def _theta(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.view(self.c, self.c + 1)

    def z(self, phi, theta):
        t = self._theta(theta).to(phi)
        return torch.addmm(t[:, -1], phi, t[:, :-1].T)

    def grad(self, phi, r):
        g = torch.empty(self.c, self.c + 1, dtype=torch.float64, device=phi.device)
        g[:, :-1] = r.T @ phi
        g[:, -1] = r.sum(0)
        return g.reshape(-1)

    def _u(self, phi):
        return torch.cat([phi, torch.ones(phi.shape[0], 1, dtype=phi.dtype, device=phi.device)], 1)

    def hess(self, phi, p, w):
        n, c = p.shape
        d = c + 1
        sw = w.sqrt()[:, None]
        u = self._u(phi) * sw                                     # sqrt(w_i) u_i
        m = (p[:, :, None] * u[:, None, :]).reshape(n, c * d)     # M[i, (c, j)] = sqrt(w) p_ic u_ij
        h = -(m.T @ m)                                            # - M^T M
        blocks = (m.T @ u).view(c, d, d)                          # U^T diag(w p_c) U
        hv = h.view(c, d, c, d)
        for k in range(c):
            hv[k, :, k, :] += blocks[k]
        return h

    def hvp(self, phi, p, w, v):
        u = self._u(phi)
        vv = v.view(self.c, self.c + 1).to(u)
        s = u @ vv.T
        ps = p * s
        t = (ps - p * ps.sum(1, keepdim=True)) * w[:, None]
        return (t.T @ u).reshape(-1)

    def reg_diag(self):
        c = self.c
        d = torch.zeros(c, c + 1, dtype=torch.float64)
        if c > 1 and self.lam:
            d[:, :-1] = 2 * self.lam / (c * (c - 1))
            d[:, :-1].fill_diagonal_(0.0)
        d[:, :-1] += 2 * self.l2
        d[:, -1] = 2 * self.mu / c
        return d.reshape(-1)

    def identity(self, temperature=1.0):
        t = torch.zeros(self.c, self.c + 1, dtype=torch.float64)
        t[:, :-1] = torch.eye(self.c, dtype=torch.float64) / temperature
        return t.reshape(-1)

    def precond(self, phi, p, w) -> Callable[[torch.Tensor], torch.Tensor]:
        """Block-diagonal preconditioner: the Hessian's exact diagonal blocks H_cc = U^T diag(w
        p_c (1 - p_c)) U + the regulariser (the coupling between classes left out). Each block is
        summed over the rows where p_c (1 - p_c) is at least 1e-3 of its largest value (a
        preconditioner need not be exact): a classifier puts few rows near each class, so the C
        blocks cost about N d^2 times the number of plausible classes per row (about 23 of 100
        for the CIFAR-100 file at its fitted temperature), not N C d^2."""
        u = self._u(phi)
        q = p * (1 - p) * w[:, None]
        c, d = self.c, self.c + 1
        blocks = torch.empty(c, d, d, dtype=torch.float64, device=phi.device)
        qmax = q.amax(0)
        for k in range(c):
            rows = torch.nonzero(q[:, k] >= 1e-3 * qmax[k]).squeeze(1)
            uk = u.index_select(0, rows)
            blocks[k] = (uk * q.index_select(0, rows)[:, k:k + 1]).T @ uk
        rd = self.reg_diag().view(c, d).to(blocks)
        blocks += torch.diag_embed(rd)
        scale = blocks.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)
        blocks += (1e-10 * scale)[:, None, None] * torch.eye(d, dtype=blocks.dtype, device=blocks.device)
        chol, info = torch.linalg.cholesky_ex(blocks)
        if bool((info != 0).any()):
            diag = blocks.diagonal(dim1=1, dim2=2).clamp_min(1e-300)
            return lambda r: (r.view(c, d) / diag).reshape(-1)
        # the blocks' inverses, once: each CG iteration then applies them in one batched
        # matrix-vector product (C small triangular solves per iteration cost several times more)
        inv = torch.cholesky_inverse(chol)
        return lambda r: torch.bmm(inv, r.view(c, d, 1)).reshape(-1)


class VectorModel(Model):
    kind = "vector"

    @property
    def size(self) -> int:
        return 2 * self.c

    def z(self, phi, theta):
        t = theta.to(phi)
        return phi * t[: self.c] + t[self.c:]

    def grad(self, phi, r):
        return torch.cat([(r * phi).sum(0), r.sum(0)])

    def hess(self, phi, p, w):
        pw = p * w[:, None]
        a = p * phi
        aw = a * w[:, None]
        haa = torch.diag((aw * phi).sum(0)) - aw.T @ a
        hab = torch.diag(aw.sum(0)) - aw.T @ p
        hbb = torch.diag(pw.sum(0)) - pw.T @ p
        return torch.cat([torch.cat([haa, hab], 1), torch.cat([hab.T, hbb], 1)], 0)

    def hvp(self, phi, p, w, v):
        v = v.to(phi)
        s = phi * v[: self.c] + v[self.c:]
        ps = p * s
        t = (ps - p * ps.sum(1, keepdim=True)) * w[:, None]
        return torch.cat([(t * phi).sum(0), t.sum(0)])

    def reg_diag(self):
        d = torch.zeros(2 * self.c, dtype=torch.float64)
        d[self.c:] = 2 * self.mu / self.c
        return d

    def identity(self, temperature=1.0):
        return torch.cat([torch.full((self.c,), 1.0 / temperature, dtype=torch.float64),
                          torch.zeros(self.c, dtype=torch.float64)])

    def precond(self, phi, p, w):
        q = p * (1 - p) * w[:, None]
        diag = torch.cat([(q * phi * phi).sum(0), q.sum(0)]) + self.reg_diag().to(p)
        diag = diag.clamp_min(1e-300)
        return lambda r: r / diag


@dataclass
class NewtonResult:
    theta: torch.Tensor
    objective: float
    nll: float
    grad_norm: float
    iterations: int
    passes: int
    converged: bool
    #: stopped because the model (with no regulariser) classifies every fit row strictly
    #: correctly: the NLL then has no minimum (it falls towards 0 as theta grows)
    separable: bool = False


class Problem:
    """F, grad F, H (or H v) of a model on the rows (all, or those with weight 1)."""

    def __init__(self, model: Model, rows: Rows, weight: Optional[Callable] = None) -> None:
        self.model = model
        self.rows = rows
        self.weight = weight  # (x, y, row0) -> (n,) float64 weights, or None (all 1)
        self.passes = 0
        self.cache_ok = rows.in_memory and rows.group is None
        # no regulariser: watch for strict separation of the fit rows (no finite optimum)
        self.check_margin = bool((model.reg_diag() == 0).all())
        self.wrong = math.inf  # weight of the rows not strictly classified right at the last evaluation
        self._feat: Optional[list] = None
        self._p: Optional[list] = None

    def _chunks(self):
        if self._feat is None:
            feat = []
            for x, y, r0 in self.rows.chunks():
                phi = features(self.model.feature, x)
                w = (torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if self.weight is None
                     else self.weight(x, y, r0))
                feat.append((phi, y, w))
            if self.cache_ok:
                self._feat = feat
            return feat
        return self._feat

    def _chunk_terms(self, theta: torch.Tensor, order: int):
        """Per chunk: (phi, y, w, p, f, grad, hess) up to ``order``."""
        for phi, y, w in self._chunks():
            z = self.model.z(phi, theta)
            lse = torch.logsumexp(z, dim=1)
            f = (w * (lse - z.gather(1, y[:, None]).squeeze(1))).sum()
            p = torch.exp(z - lse[:, None])
            yield phi, y, w, p, f

    def evaluate(self, theta: torch.Tensor, order: int):
        """order 0: (F, nll); 1: + grad; 2: + dense Hessian; 'cg': + grad, keeps p for H v (and
        for :meth:`hessian`: the dense Hessian only where a step needs it)."""
        m = self.model
        P = m.size
        dense = order == 2
        need_g = order != 0
        margin = need_g and self.check_margin
        length = 2 + (P if need_g else 0) + (P * P if dense else 0) + (1 if margin else 0)
        ps = []

        def one(phi, y, w, p, f):
            out = [f.reshape(1), w.sum().reshape(1)]
            if need_g:
                r = p.clone()
                r[torch.arange(p.shape[0], device=p.device), y] -= 1.0
                out.append(m.grad(phi, r * w[:, None]))
            if dense:
                out.append(m.hess(phi, p, w).reshape(-1))
            if margin:  # rows with p_y <= max_{k != y} p_k (z_y <= max z_k up to underflow)
                py = p.gather(1, y[:, None])
                other = p.scatter(1, y[:, None], -1.0).amax(1, keepdim=True)
                out.append((w[:, None] * (py <= other)).sum().reshape(1))
            return torch.cat(out)

        total = torch.zeros(length, dtype=torch.float64)
        if self.rows.group is None:
            acc = None
            for phi, y, w, p, f in self._chunk_terms(theta, order):
                v = one(phi, y, w, p, f)
                acc = v if acc is None else acc + v
                if order == "cg":
                    ps.append((phi, w, p))
            if acc is not None:
                total = acc.cpu()
        else:
            feats = iter(self._chunks())

            def fn(x, y, r0):
                phi, yy, w = next(feats)
                z = m.z(phi, theta)
                lse = torch.logsumexp(z, dim=1)
                f = (w * (lse - z.gather(1, yy[:, None]).squeeze(1))).sum()
                p = torch.exp(z - lse[:, None])
                if order == "cg":
                    ps.append((phi, w, p))
                return one(phi, yy, w, p, f)

            total = self.rows.row_sum(fn, length)
        self.passes += 1
        nrm = float(total[1])
        if nrm <= 0:
            raise ValueError(f"{self.rows.fn}: no rows to fit (a cross-validation fold is empty)")
        nll = float(total[0]) / nrm
        if margin:
            self.wrong = float(total[-1])
        r, gr = m.reg(theta)
        F = nll + r
        if order == 0:
            return F, nll
        g = total[2:2 + P] / nrm + gr
        if dense:
            h = total[2 + P:2 + P + P * P].view(P, P) / nrm + torch.diag(m.reg_diag())
            return F, nll, g, h
        if order == "cg":
            self._p = ps
            self._nrm = nrm
        return F, nll, g

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.rows.group is None:
            out = None
            for phi, w, p in self._p:
                h = m.hvp(phi, p, w, v.to(phi.device))
                out = h if out is None else out + h
            out = out.cpu() if out is not None else torch.zeros_like(v)
        else:
            it = iter(self._p)

            def fn(x, y, r0):
                phi, w, p = next(it)
                return m.hvp(phi, p, w, v.to(phi.device))

            out = self.rows.row_sum(fn, m.size)
        self.passes += 1
        return out / self._nrm + m.reg_diag() * v

    def hessian(self) -> torch.Tensor:
        """The dense Hessian (P, P) at the point of the last ``evaluate(theta, "cg")``, from the
        p kept there (the sums of ``evaluate(theta, 2)``, in the same order)."""
        m = self.model
        P = m.size
        if self.rows.group is None:
            out = None
            for phi, w, p in self._p:
                h = m.hess(phi, p, w).reshape(-1)
                out = h if out is None else out + h
            out = out.cpu() if out is not None else torch.zeros(P * P, dtype=torch.float64)
        else:
            it = iter(self._p)

            def fn(x, y, r0):
                phi, w, p = next(it)
                return m.hess(phi, p, w).reshape(-1)

            out = self.rows.row_sum(fn, P * P)
        return out.view(P, P) / self._nrm + torch.diag(m.reg_diag())

    def precond(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # Built from this rank's rows (a preconditioner need not be exact).
        if not self._p:
            d = self.model.reg_diag().clamp_min(1e-12)
            return lambda r: r / d
        phi = torch.cat([a for a, _, _ in self._p])
        w = torch.cat([b for _, b, _ in self._p])
        p = torch.cat([c for _, _, c in self._p])
        fn = self.model.precond(phi, p, w / max(float(w.sum()), 1e-300))
        return lambda r: fn(r.to(phi.device)).cpu()


def _pcg(hvp: Callable, precond: Callable, g: torch.Tensor, rtol: float, max_iter: int) -> Tuple[torch.Tensor, int]:
    """Preconditioned CG on H s = -g (H symmetric PSD); stops at ||r|| <= rtol ||g||."""
    s = torch.zeros_like(g)
    r = -g.clone()
    z = precond(r)
    d = z.clone()
    rz = float(r @ z)
    g0 = float(g.norm())
    its = 0
    for its in range(1, max_iter + 1):
        hd = hvp(d)
        dhd = float(d @ hd)
        if dhd <= 0:  # direction of zero curvature: stop with what we have (or steepest descent)
            if its == 1:
                s = -g.clone()
            break
        a = rz / dhd
        s += a * d
        r -= a * hd
        if float(r.norm()) <= rtol * g0:
            break
        z = precond(r)
        rz_new = float(r @ z)
        d = z + (rz_new / rz) * d
        rz = rz_new
    return s, its


def newton(problem: Problem, theta0: torch.Tensor, tol: float, max_iter: int,
           dense_max: int = DENSE_MAX, precond_every: int = 1) -> NewtonResult:
    """Minimise F from theta0; stops when max |grad F| <= tol (see the module docstring).
    ``precond_every``: the truncated Newton steps rebuild their preconditioner every this many
    iterations (1: each; more: it is reused, cheaper where the CG iterations stay few)."""
    m = problem.model
    dense = m.size <= dense_max
    theta = theta0.clone()
    order = "cg"  # F, grad, and p kept: H v (truncated Newton) or H (dense) when a step needs it
    state = problem.evaluate(theta, order)
    its = 0
    converged = separable = False
    pre: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    while True:
        F, g = state[0], state[2]
        gnorm = float(g.abs().max())
        if problem.check_margin and problem.wrong == 0:
            # every row strictly right and no regulariser: s * theta lowers F for every s > 1,
            # so there is no optimum to reach (a gradient that underflowed to 0 included);
            # stop here rather than follow theta to infinity
            separable = True
            break
        if gnorm <= tol:
            converged = True
            break
        if its >= max_iter:
            break
        its += 1
        if dense:
            h = problem.hessian()
            ridge = 1e-12 * float(h.diagonal().abs().mean()) + 1e-300
            eye = torch.eye(h.shape[0], dtype=h.dtype)
            chol, info = torch.linalg.cholesky_ex(h + ridge * eye)
            if int(info) != 0:
                step = torch.linalg.lstsq(h + ridge * eye, -g[:, None]).solution[:, 0]
            else:
                step = torch.cholesky_solve(-g[:, None], chol)[:, 0]
        else:
            gn2 = float(g.norm())
            rtol = min(0.5, math.sqrt(gn2))
            if pre is None or (its - 1) % precond_every == 0:
                pre = problem.precond()
            step, _ = _pcg(problem.hvp, pre, g, rtol, max_iter=250)
        slope = float(g @ step)
        if slope >= 0:  # not a descent direction (numerical trouble): steepest descent
            step = -g
            slope = -float(g @ g)
        t = 1.0
        accepted = False
        for _ in range(60):
            trial = theta + t * step
            new = problem.evaluate(trial, order) if t == 1.0 else problem.evaluate(trial, 0)
            if math.isfinite(new[0]) and new[0] <= F + 1e-4 * t * slope:
                accepted = True
                break
            # at the optimum's floating-point floor the objective cannot fall any more
            if abs(new[0] - F) <= 1e-15 * max(1.0, abs(F)) and t < 1e-6:
                break
            t *= 0.5
        if not accepted:
            break  # no decrease possible in float64: theta is optimal to rounding
        theta = trial
        state = new if t == 1.0 else problem.evaluate(theta, order)
    return NewtonResult(theta=theta, objective=float(state[0]), nll=float(state[1]),
                        grad_norm=float(state[2].abs().max()), iterations=its,
                        passes=problem.passes, converged=converged, separable=separable)
