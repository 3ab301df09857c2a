/* ggml as a peer of benchmarks/peers.py: y = x W^T through ggml_mul_mat on ggml's CPU backend.
 *
 * Our own harness around ggml's public API (no ggml code in here); built against a ggml checkout
 * by benchmarks/ggml_peer_build.sh into a shared library that peers.py loads with ctypes:
 *
 *   void *gp_new(int type, int64_t n, int64_t k, int64_t m, const float *w, int threads);
 *       type: ggml_type (34 = TQ1_0, 35 = TQ2_0); w (n, k) float32, row-major, the weight to
 *       quantize (ggml_quantize_chunk: per 256-weight block, d = max |w| in fp16, codes
 *       round(w / d) in {-1, 0, 1}, so a ternary weight s * {-1, 0, 1} is kept as is, s in fp16);
 *       k a multiple of 256; m tokens; `threads` workers in a threadpool of ggml's own, kept for
 *       the handle's life, with polling off (poll = 0: between graphs the workers wait on a
 *       condition variable instead of spinning, which took a core from the other contenders of
 *       peers.py on a 2-core machine). NULL on failure.
 *   int gp_run(void *h, const float *x, float *y);
 *       x (m, k) float32 -> y (m, n) float32; one ggml_graph_compute of the one-node graph
 *       ggml_mul_mat(W, X): ggml quantizes X to its dot type (Q8_K) inside the call, as in a
 *       model. Returns 0 on success.
 *   void gp_free(void *h);
 *
 * ggml's tensors point at the caller's x and y for the call (no copies).
 */

#include <stdint.h>
#include <stdlib.h>

#include "ggml-cpu.h"
#include "ggml.h"

typedef struct {
    struct ggml_context *ctx;
    struct ggml_cgraph *graph;
    struct ggml_tensor *x, *y;
    struct ggml_threadpool *pool;
    struct ggml_cplan plan;
    void *work;
} peer;

void gp_free(void *h) {
    peer *p = h;
    if (!p) return;
    if (p->pool) ggml_threadpool_free(p->pool);
    if (p->ctx) ggml_free(p->ctx);
    free(p->work);
    free(p);
}

void *gp_new(int type, int64_t n, int64_t k, int64_t m, const float *w, int threads) {
    if ((type != GGML_TYPE_TQ1_0 && type != GGML_TYPE_TQ2_0) || n < 1 || m < 1 || k % 256 ||
        threads < 1)
        return NULL;
    ggml_cpu_init();
    peer *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    const size_t wbytes = ggml_row_size((enum ggml_type)type, k) * (size_t)n;
    struct ggml_init_params ip = {
        .mem_size = wbytes + 4 * ggml_tensor_overhead() + ggml_graph_overhead() + (1 << 16),
        .mem_buffer = NULL,
        .no_alloc = false,
    };
    p->ctx = ggml_init(ip);
    if (!p->ctx) goto fail;
    struct ggml_tensor *wt = ggml_new_tensor_2d(p->ctx, (enum ggml_type)type, k, n);
    if (!wt) goto fail;
    ggml_quantize_chunk((enum ggml_type)type, w, wt->data, 0, n, k, NULL);
    /* x and y hold no data of their own: gp_run points them at the caller's arrays */
    ggml_set_no_alloc(p->ctx, true);
    p->x = ggml_new_tensor_2d(p->ctx, GGML_TYPE_F32, k, m);
    p->y = ggml_mul_mat(p->ctx, wt, p->x);
    p->graph = ggml_new_graph(p->ctx);
    ggml_build_forward_expand(p->graph, p->y);
    struct ggml_threadpool_params tp = ggml_threadpool_params_default(threads);
    tp.poll = 0; /* idle workers sleep: see gp_new above */
    p->pool = ggml_threadpool_new(&tp);
    if (!p->pool) goto fail;
    p->plan = ggml_graph_plan(p->graph, threads, p->pool);
    if (p->plan.work_size) {
        p->work = malloc(p->plan.work_size);
        if (!p->work) goto fail;
        p->plan.work_data = p->work;
    }
    return p;
fail:
    gp_free(p);
    return NULL;
}

int gp_run(void *h, const float *x, float *y) {
    peer *p = h;
    p->x->data = (void *)x;
    p->y->data = y;
    return ggml_graph_compute(p->graph, &p->plan) == GGML_STATUS_SUCCESS ? 0 : 1;
}
