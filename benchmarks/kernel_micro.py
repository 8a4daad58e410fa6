"""Kernel microbenchmarks behind two decisions (GPU only): a fused SwiGLU grouped GEMM in Triton
against cuBLAS + Inductor's SiLU·mul, and SDPA on grouped K/V (``enable_gqa``) against
``repeat_kv`` copies, per SDPA backend, with exactness against each other.

    python benchmarks/kernel_micro.py            # both; or: ... mlp / ... sdpa / ... gemm / ... flex
    OUT=dir python benchmarks/kernel_micro.py    # JSON to dir/micro.json (default /tmp)

Shapes: a steady diagonal of Llama-3.2-1B ARMT cells (16 lanes, 1152 rows). Timing: CUDA events
after warm-up, median of 30. Results: benchmarks/RESULTS.md (session 4).
"""
import json, os, sys, time, statistics
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
dev = "cuda"


def bench(fn, warm=5, rep=30):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def configs():
    out = []
    for bm, bn, bk, st, w in [
        (128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 64, 64, 4, 4), (128, 64, 64, 5, 8),
        (64, 128, 64, 4, 4), (128, 128, 32, 5, 8), (256, 64, 64, 3, 8),
    ]:
        out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=st, num_warps=w,
                                 pre_hook=_set_blocks))
    return out


def _set_blocks(nargs):
    bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["g_desc"].block_shape = [bn, bk]
    nargs["u_desc"].block_shape = [bn, bk]


@triton.jit
def _swiglu_tile(a_desc, g_desc, u_desc, out_ptr, lane, pid, M, N, K, stride_og, stride_om,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BM, BN] output tile of lane ``lane``: ``silu(a @ g^T) * (a @ u^T)``, rounded as eager."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    gsize = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    row_a = lane * M + pid_m * BM
    row_b = lane * N + pid_n * BN
    acc_g = tl.zeros((BM, BN), tl.float32)
    acc_u = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        a = a_desc.load([row_a, k])
        g = g_desc.load([row_b, k])
        u = u_desc.load([row_b, k])
        acc_g = tl.dot(a, g.T, acc_g)
        acc_u = tl.dot(a, u.T, acc_u)
    gb = acc_g.to(tl.bfloat16).to(tl.float32)
    ub = acc_u.to(tl.bfloat16).to(tl.float32)
    h = (gb * tl.sigmoid(gb) * ub).to(tl.bfloat16)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    ptrs = out_ptr + lane * stride_og + rm[:, None] * stride_om + rn[None, :]
    tl.store(ptrs, h, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(configs=configs(), key=["M", "N", "K"])
@triton.jit
def _swiglu_kernel(a_desc, g_desc, u_desc, out_ptr, M, N, K, stride_og, stride_om,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    _swiglu_tile(a_desc, g_desc, u_desc, out_ptr, tl.program_id(1), tl.program_id(0), M, N, K, stride_og, stride_om,
                 BM, BN, BK, GROUP_M)


def _operands(x, wg, wu):
    """The output and the TMA descriptors of ``x`` [G, M, K], ``wg``/``wu`` [G, N, K] (block
    shapes are set per config by ``_set_blocks``)."""
    G, M, K = x.shape
    N = wg.shape[1]
    out = torch.empty(G, M, N, dtype=x.dtype, device=x.device)
    dummy = [8, 8]
    descs = [TensorDescriptor.from_tensor(t.view(-1, K), dummy) for t in (x, wg, wu)]
    return out, descs, (G, M, N, K)


def swiglu_bmm(x, wg, wu):
    out, descs, (G, M, N, K) = _operands(x, wg, wu)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), G)
    _swiglu_kernel[grid](*descs, out, M, N, K, out.stride(0), out.stride(1))
    return out


def pconfigs():
    out = []
    for bm, bn, bk, st, w in [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 64, 64, 4, 8), (128, 64, 64, 5, 4), (128, 128, 32, 5, 8)]:
        for ws in (False,):  # warp_specialize=True: one config did not finish compiling in 10 minutes (H100, triton 3.6)
            for fl in (False, True):
                out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "WS": ws, "FLAT": fl}, num_stages=st, num_warps=w, pre_hook=_set_blocks))
    return out


@triton.autotune(configs=pconfigs(), key=["M", "N", "K"])
@triton.jit
def _swiglu_persistent(a_desc, g_desc, u_desc, out_ptr, M, N, K, G, stride_og, stride_om, NUM_SMS: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       WS: tl.constexpr, FLAT: tl.constexpr):
    per_lane = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile_id in tl.range(tl.program_id(0), per_lane * G, NUM_SMS, flatten=FLAT, warp_specialize=WS):
        _swiglu_tile(a_desc, g_desc, u_desc, out_ptr, tile_id // per_lane, tile_id % per_lane, M, N, K,
                     stride_og, stride_om, BM, BN, BK, GROUP_M)


NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count


def swiglu_persistent(x, wg, wu):
    out, descs, (G, M, N, K) = _operands(x, wg, wu)
    grid = lambda meta: (min(NUM_SMS, triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]) * G),)
    _swiglu_persistent[grid](*descs, out, M, N, K, G, out.stride(0), out.stride(1), NUM_SMS)
    return out


def ref_mlp_up(x, wg, wu):
    return F.silu(torch.bmm(x, wg.transpose(1, 2))) * torch.bmm(x, wu.transpose(1, 2))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


results = {}
G, M, K, N = 16, 1152, 2048, 8192
if "mlp" in sys.argv[1:] or len(sys.argv) == 1:
    x = torch.randn(G, M, K, device=dev, dtype=torch.bfloat16)
    wg = torch.randn(G, N, K, device=dev, dtype=torch.bfloat16) * 0.02
    wu = torch.randn(G, N, K, device=dev, dtype=torch.bfloat16) * 0.02
    wd = torch.randn(G, K, N, device=dev, dtype=torch.bfloat16) * 0.02
    flops_up = 2 * 2 * G * M * K * N
    comp = torch.compile(ref_mlp_up)
    t = {}
    t["cublas_gate_up_only"] = bench(lambda: (torch.bmm(x, wg.transpose(1, 2)), torch.bmm(x, wu.transpose(1, 2))))
    t["inductor_default_up"] = bench(lambda: comp(x, wg, wu))
    g0 = torch.bmm(x, wg.transpose(1, 2)); u0 = torch.bmm(x, wu.transpose(1, 2))
    t["silu_mul_only_eager2"] = bench(lambda: F.silu(g0) * u0)
    y_ref = comp(x, wg, wu)
    y64 = (F.silu((x.double() @ wg.double().transpose(1, 2))) * (x.double() @ wu.double().transpose(1, 2)))
    t0 = time.time()
    y = swiglu_bmm(x, wg, wu)
    torch.cuda.synchronize()
    results["triton_autotune_s"] = time.time() - t0
    results["triton_best_config"] = str(_swiglu_kernel.best_config)
    t["triton_swiglu"] = bench(lambda: swiglu_bmm(x, wg, wu))
    try:
        t0 = time.time()
        yp = swiglu_persistent(x, wg, wu)
        torch.cuda.synchronize()
        results["persistent_autotune_s"] = time.time() - t0
        results["persistent_best_config"] = str(_swiglu_persistent.best_config)
        results["rel_persistent_vs_inductor"] = rel(yp, y_ref)
        t["triton_persistent"] = bench(lambda: swiglu_persistent(x, wg, wu))
        results["tflops_persistent"] = flops_up / t["triton_persistent"] / 1e9
        timings = getattr(_swiglu_persistent, "configs_timings", None) or {}
        results["persistent_timings"] = {str(c): v for c, v in timings.items()}
    except Exception as exc:
        import traceback; traceback.print_exc()
        results["persistent_error"] = str(exc)[:400]
    results["rel_triton_vs_inductor"] = rel(y, y_ref)
    results["rel_inductor_vs_f64"] = rel(y_ref, y64)
    results["rel_triton_vs_f64"] = rel(y, y64)
    # whole MLP: up + down
    comp_full = torch.compile(lambda x, wg, wu, wd: torch.bmm(ref_mlp_up(x, wg, wu), wd.transpose(1, 2)))
    t["inductor_default_mlp"] = bench(lambda: comp_full(x, wg, wu, wd))
    t["triton_up_cublas_down"] = bench(lambda: torch.bmm(swiglu_bmm(x, wg, wu), wd.transpose(1, 2)))
    for k, v in t.items():
        results[k + "_ms"] = v
    results["tflops_cublas_gate_up"] = flops_up / t["cublas_gate_up_only"] / 1e9
    results["tflops_triton"] = flops_up / t["triton_swiglu"] / 1e9
    print(json.dumps(results, indent=1), flush=True)

if "sdpa" in sys.argv[1:] or len(sys.argv) == 1:
    from torch.nn.attention import sdpa_kernel, SDPBackend
    B, H, Hkv, T, D = 16, 32, 8, 1152, 64
    q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16)
    rep = lambda t_: t_[:, :, None].expand(B, Hkv, H // Hkv, T, D).reshape(B, H, T, D)
    ke, ve = rep(k), rep(v)
    s = {}
    s["expand_clone_kv"] = bench(lambda: (rep(k), rep(v)))
    s["sdpa_expanded_default"] = bench(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True))
    o_ref = F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
    s["sdpa_gqa_default"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    o_g = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    sres = {"rel_gqa_default_vs_expanded": rel(o_g, o_ref), "equal": bool(torch.equal(o_g, o_ref))}
    for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        for gqa in (False, True):
            try:
                with sdpa_kernel(be):
                    kk, vv = (k, v) if gqa else (ke, ve)
                    fn = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                    o = fn()
                    s[f"sdpa_{name}_gqa{int(gqa)}"] = bench(fn)
                    sres[f"rel_{name}_gqa{int(gqa)}"] = rel(o, o_ref)
                    sres[f"equal_{name}_gqa{int(gqa)}"] = bool(torch.equal(o, o_ref))
            except Exception as exc:  # noqa
                sres[f"err_{name}_gqa{int(gqa)}"] = str(exc)[:200]
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True); torch.cuda.synchronize()
    sres["gqa_default_kernels"] = [e.key[:90] for e in prof.key_averages()][:6]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, ke, ve, is_causal=True); torch.cuda.synchronize()
    sres["expanded_default_kernels"] = [e.key[:90] for e in prof.key_averages()][:6]
    for k_, v_ in s.items():
        sres[k_ + "_ms"] = v_
    print(json.dumps(sres, indent=1), flush=True)
    results.update(sres)

if "flex" in sys.argv[1:]:
    # Causal attention of a steady diagonal, grouped K/V: cuDNN (SDPA's pick) against
    # FlexAttention compiled by Inductor (Triton), with and without autotuning.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, H, Hkv, T, D = 16, 32, 8, 1152, 64
    q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16)
    f = {}
    cudnn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = cudnn()
    f["cudnn_gqa_ms"] = bench(cudnn)
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=dev)
    for name, mode in (("flex", None), ("flex_autotune", "max-autotune-no-cudagraphs")):
        try:
            fn = torch.compile(flex_attention, mode=mode) if mode else torch.compile(flex_attention)
            t0 = time.time()
            out = fn(q, k, v, block_mask=mask, enable_gqa=True)
            torch.cuda.synchronize()
            f[name + "_compile_s"] = time.time() - t0
            f[name + "_ms"] = bench(lambda: fn(q, k, v, block_mask=mask, enable_gqa=True))
            f[name + "_rel_vs_cudnn"] = rel(out, ref)
        except Exception as exc:  # noqa
            f[name + "_err"] = str(exc)[:300]
    flop = 2 * B * H * T * T * D  # causal: half of 4 T^2 D
    for key in [k_ for k_ in f if k_.endswith("_ms")]:
        f[key[:-3] + "_tflops"] = flop / f[key] / 1e9
    print(json.dumps(f, indent=1), flush=True)
    results.update(f)

if "gemm" in sys.argv[1:]:
    # The step's bmm shapes [G, M, K] x [G, K, N] (weights stored [G, N, K]): cuBLAS's default
    # algorithm against cuBLASLt and against TunableOp's pick among the cuBLASLt algorithms.
    shapes = {"q_o": (2048, 2048), "k_v": (2048, 512), "gate_up": (2048, 8192), "down": (8192, 2048),
              "w_mq": (2048, 64), "mem_read": (384, 2048)}
    g = {}
    for lanes in (16, 8):
        for name, (k_, n_) in shapes.items():
            a = torch.randn(lanes, M, k_, device=dev, dtype=torch.bfloat16)
            w = torch.randn(lanes, n_, k_, device=dev, dtype=torch.bfloat16) * 0.02
            fn = lambda: torch.bmm(a, w.transpose(1, 2))
            flop = 2 * lanes * M * k_ * n_
            key = f"{name}_g{lanes}"
            ref = fn()
            g[key + "_default_ms"] = bench(fn)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            try:
                out = fn()
                g[key + "_cublaslt_ms"] = bench(fn)
                g[key + "_cublaslt_equal"] = bool(torch.equal(out, ref))
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
            torch.cuda.tunable.enable(True)
            torch.cuda.tunable.tuning_enable(True)
            torch.cuda.tunable.set_max_tuning_duration(200)
            try:
                t0 = time.time()
                out = fn()
                torch.cuda.synchronize()
                g[key + "_tune_s"] = time.time() - t0
                g[key + "_tunable_ms"] = bench(fn)
                g[key + "_tunable_equal"] = bool(torch.equal(out, ref))
                g[key + "_tunable_rel"] = rel(out, ref)
            except Exception as exc:  # noqa
                g[key + "_tunable_err"] = str(exc)[:200]
            finally:
                torch.cuda.tunable.enable(False)
            g[key + "_default_tflops"] = flop / g[key + "_default_ms"] / 1e9
            best = min(v for k2, v in g.items() if k2.startswith(key) and k2.endswith("_ms"))
            g[key + "_best_tflops"] = flop / best / 1e9
            print(key, {k2[len(key) + 1:]: (round(v, 4) if isinstance(v, float) else v) for k2, v in g.items() if k2.startswith(key + "_")}, flush=True)
    try:
        g["tunable_results"] = [list(map(str, r)) for r in torch.cuda.tunable.get_results()][:40]
    except Exception as exc:  # noqa
        g["tunable_results"] = str(exc)[:200]
    results.update(g)

json.dump(results, open(os.path.join(OUT, "micro.json"), "w"), indent=1)
print("\nkernel            ms")
for name, value in sorted(results.items()):
    if name.endswith("_ms"):
        print(f"  {name[:-3]:<28} {value:8.3f}")
