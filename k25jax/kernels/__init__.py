"""Custom kernels for what XLA lacks on a platform (XLA FFI custom calls): on CPU, the routed experts of an MoE
layer (`routed_experts_cpu`) and MLA's absorbed attention over the latent cache (`absorbed_attention_cpu`), both
for generation's decode steps; `build` compiles and registers them on first use (AVX-512 hosts; elsewhere the
callers use XLA's ops)."""
