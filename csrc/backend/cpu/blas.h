/* blas.h - the CBLAS entry points the CPU backend uses.
 *
 * With OpenBLAS from PyPI (scipy-openblas32, the default build) every symbol
 * carries a scipy_ prefix so it cannot clash with another OpenBLAS in the
 * process (numpy's, torch's); TK_BLAS_SCIPY selects those names. Otherwise
 * the system's plain cblas_* names are used.
 */
#ifndef TK_BLAS_H
#define TK_BLAS_H

#include <cblas.h>

#ifdef TK_BLAS_SCIPY
#define tk_cblas_sgemm scipy_cblas_sgemm
#define tk_blas_set_threads scipy_openblas_set_num_threads
#else
#define tk_cblas_sgemm cblas_sgemm
#define tk_blas_set_threads openblas_set_num_threads
#endif

#endif
