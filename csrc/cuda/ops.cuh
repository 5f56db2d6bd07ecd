// softcal CUDA: the host entry points of every op (registered in csrc/cuda/register.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace softcal {
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction);

std::tuple<at::Tensor, at::Tensor> tsce_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& denom,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_logits_grad, bool need_temperature_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_fused_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad);

std::tuple<at::Tensor, at::Tensor> tsce_fused_inplace_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad);

void scale_rows_inplace_cuda(const at::Tensor& grad, const at::Tensor& scale);

at::Tensor softmax_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& temperature_t,
                            double temperature, int64_t dim, bool log);

std::tuple<at::Tensor, at::Tensor> softmax_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& out,
    const std::optional<at::Tensor>& temperature_t, double temperature, int64_t dim, bool log,
    bool need_temperature_grad);

at::Tensor temperature_stats_cuda(const at::Tensor& logits, const at::Tensor& target, double beta);

}  // namespace cuda
}  // namespace softcal
