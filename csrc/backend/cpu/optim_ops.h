/* optim_ops.h - the CPU kernels of the optimizer ops (see optim_ops.c). */
#ifndef TK_CPU_OPTIM_OPS_H
#define TK_CPU_OPTIM_OPS_H

#include "../../core/pool.h"
#include "../backend.h"

double tk_cpu_sum_squares(tk_pool *pool, const float *x, size_t n);
void tk_cpu_adamw(tk_pool *pool, float *p, float *g, float *m, float *v, size_t n, const tk_adamw_factors *f);
float tk_cpu_adamw_peak(tk_pool *pool, const float *p, const float *g, const float *m, const float *v, size_t n,
                        const tk_adamw_factors *f);

#endif
