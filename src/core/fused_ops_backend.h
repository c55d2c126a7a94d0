// How the fused layer ops (rms_norm.h, gated_product.h, partial_rotary_embedding.h) reach a
// backend. src/core/fused_ops.cpp validates the arguments and calls the backend of the tensors'
// device with the sizes it found; src/cpu and src/cuda implement these functions.
#pragma once

#include <cstddef>
#include <cstdint>

#include "flashdelta/gated_product.h"
#include "flashdelta/partial_rotary_embedding.h"
#include "flashdelta/rms_norm.h"

namespace flashdelta::detail {

struct RowsShape {
  int64_t rows = 0;  // R: the leading dimensions, flattened
  int64_t dim = 0;   // D: the normalised / elementwise dimension
};

enum class GateActivation { kSilu, kSigmoid };  // swiglu, attention_gate

struct RotaryShape {
  int64_t batch = 0, seq_len = 0, num_q_heads = 0, num_k_heads = 0, head_dim = 0,
          rotary_dim = 0;
};

// rms_norm and rms_norm_gated share the backend entry points (in.gate present or not).
#define FLASHDELTA_FUSED_OPS_BACKEND_DECLARATIONS                                                \
  void rms_norm_forward(const RmsNormInputs& in, const RmsNormForwardOutputs& out,               \
                        const RowsShape& shape);                                                 \
  size_t rms_norm_backward_workspace_bytes(const RowsShape& shape);                             \
  void rms_norm_backward(const RmsNormInputs& in, const RmsNormBackwardArgs& args,               \
                         const RowsShape& shape);                                                \
  void gated_product_forward(GateActivation act, const GatedProductArgs& in,                    \
                             const TensorRef& out, const RowsShape& shape);                      \
  void gated_product_backward(GateActivation act, const GatedProductArgs& in,                   \
                              const GatedProductGradients& grads, const RowsShape& shape);       \
  /* transpose: apply the transposed rotation (the backward) */                                  \
  void partial_rotary_embedding(const PartialRotaryEmbeddingArgs& in, const TensorRef& q_out,    \
                                const TensorRef& k_out, const RotaryShape& shape, bool transpose);

namespace cpu {
FLASHDELTA_FUSED_OPS_BACKEND_DECLARATIONS
}
namespace cuda {
FLASHDELTA_FUSED_OPS_BACKEND_DECLARATIONS
}

#undef FLASHDELTA_FUSED_OPS_BACKEND_DECLARATIONS

}  // namespace flashdelta::detail
