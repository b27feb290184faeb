// The decoder library's functions (decoder_ops.cpp, group_int8.cpp, blocked_linear.cpp,
// amx_linear.cpp, row_argmax.cpp, decoder_loop.cpp), declared once for the files that call or
// bind them.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

// decoder_ops.cpp
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps);
void add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps);
void rotary_embedding(at::Tensor query, at::Tensor key, const at::Tensor& positions,
                      const at::Tensor& cos, const at::Tensor& sin);
void silu_and_mul(at::Tensor out, const at::Tensor& x);

// group_int8.cpp
void group_int8_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& codes,
                       const at::Tensor& scale, const at::Tensor& zero, int64_t group);

// blocked_linear.cpp: x @ W.T (+ b), W packed into blocks of 32 columns ([n / 32, k, 32]), float32
// or int8 codes times a scale per column, or per group and column plus an offset; built where the
// compiler targets AVX-512
#ifdef __AVX512F__
at::Tensor blocked_linear(const at::Tensor& x, const at::Tensor& packed,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& zero);
// silu_and_mul of a float32 gate-up projection (gate blocks first, then as many up blocks, no
// bias) in the matmul's own pass: gate block b and up block b in one tile, out [rows, n / 2]; the
// same bits as blocked_linear then silu_and_mul.
at::Tensor blocked_silu_linear(const at::Tensor& x, const at::Tensor& packed);
#endif

// amx_linear.cpp: x @ W.T (+ b) for bfloat16 x and W, W packed into blocks of 32 columns with
// their inputs in pairs ([n / 32, k / 2, 32, 2]), on AMX tiles; built where the compiler targets
// AMX-BF16 (and usable once the kernel grants the process its tiles: amx_linear_usable)
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define BATON_AMX 1
bool amx_linear_usable();
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed,
                      const std::optional<at::Tensor>& bias);
// silu_and_mul(amx_linear(x, packed, none)) in one pass, to the bit, for a gate-up projection
// (its up blocks after its gate blocks): [rows, n / 2]
at::Tensor amx_silu_linear(const at::Tensor& x, const at::Tensor& packed);
#endif

// row_argmax.cpp: each row's torch.argmax, float32 or bfloat16
at::Tensor row_argmax(const at::Tensor& logits);

// decoder_loop.cpp
at::Tensor decoder_layers(at::Tensor residual, const std::vector<at::Tensor>& norms,
                          const std::vector<at::Tensor>& weights,
                          const std::vector<std::optional<at::Tensor>>& codes,
                          const std::vector<std::optional<at::Tensor>>& scales,
                          const std::vector<std::optional<at::Tensor>>& zeros,
                          const std::vector<std::optional<at::Tensor>>& biases,
                          const std::vector<int64_t>& code_rows,
                          const std::vector<int64_t>& buckets, const at::Tensor& positions,
                          const at::Tensor& cos, const at::Tensor& sin,
                          const std::vector<at::Tensor>& keys,
                          const std::vector<at::Tensor>& values, const at::Tensor& slot_mapping,
                          const at::Tensor& block_table, const at::Tensor& cu_seqlens_q,
                          const at::Tensor& context_lens, int64_t num_heads, double scale,
                          double eps, int64_t write_kv_address, int64_t paged_attention_address);
