"""Triton kernels of linreg-fused and their launch helpers (installed as
``linreg_fused.kernels``). No autograd and no modules here: plain tensors in,
plain tensors out. Import the submodules; this package imports nothing
itself, so ``specs`` can be used without Triton.

- linear_mse_grad: the single-pass kernel (residual, loss, partial dW/db)
- reduce_update:   finish the partial sums; write gradients or apply SGD in place
- linear_forward:  inference, Y = X·Wᵀ + b
- grad_rows, grad_chunks:        the gradient pass in the "rows" (small O·D) and "chunks" (wide, deep) formulations
- grad_mma:        the gradient pass for a bf16 X on tensor cores (the "mma" formulation: three-term bf16 splits)
- forward_rows, forward_chunks:  inference in the rows and chunks formulations
- formulations:    whichever formulation config.choose_formulation decides, for either pass
- sgd_step:        a whole step in one launch (opt-in until checked on a GPU: backend.STEP_LAUNCHES)
- step, launch:    the repeat-call path: a step's launches planned once, relaunched cheaply
- fused_fit:       many SGD steps of a small problem in one launch
- linear_stats:    the one-pass co-moments (XᵀX, TᵀX, TᵀT, column sums) for fit's statistics path
- stats_sgd:       full-batch SGD epochs on those co-moments, many epochs in one launch
- linear_qr:       the one-pass R factor (TSQR) behind LinearStats and solve
- grouped_stats:   the per-group statistics pass
- probe:           whether Triton's interpreter can run these kernels here (checked at first use)
- specs:           plain data the kernels share (no Triton)
- tiles:           jit helpers shared by the kernels (loads, fp64 scalars, the two tile products)
- config:          block sizes, warps, pipeline stages, grid sizes; which formulation runs
- blocks:          the blocks of the rows, chunks and mma formulations
- measured:        measured block choices per Triton release; device: the device profile
- plan:            LaunchPlan, what each launch helper's plan_* step returns (bench/compile_report.py
                   compiles those plans for sm_90/sm_80 without a GPU)
"""
