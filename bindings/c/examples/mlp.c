/*
 * A small engine that is not Stable Diffusion: a chain of residual MLP blocks
 * (x += W2 * leaky_relu(W1 * x + b1) + b2) with its own CPU math, paged by Ferry
 * on the simulated device under a budget smaller than its weights.
 *
 * It checks that every streamed run (auto, group, sequential, traced order; weights
 * from a safetensors file or from host buffers) is bit-identical to a fully resident
 * run and to a plain CPU run (weights copied from a file, used in place from the file, or
 * copied from host buffers), that a perturbed weight changes the output, and that
 * errors (double free, use after free, a budget too small) come back as status codes.
 *
 * Usage: mlp OUT_DIR   (writes OUT_DIR/mlp.safetensors, trace.json, metrics.txt)
 */
#include "ferry.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define D 64     /* model width */
#define H 192    /* hidden width */
#define L 8      /* blocks */
#define T 4      /* tokens per pass */
#define NT 4     /* tensors per block */
#define COMPUTE_NS 20000

static const uint64_t SHAPES[NT][2] = {{H, D}, {H, 1}, {D, H}, {D, 1}};
static const char *SUFFIX[NT] = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"};
static float *W[L][NT];
static char NAMES[L][NT][64];

#define CHECK(call)                                                                   \
    do {                                                                              \
        FerryStatus st_ = (call);                                                     \
        if (st_ != FERRY_STATUS_OK) {                                                 \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #call, \
                    ferry_status_name(st_), ferry_last_error());                      \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

#define EXPECT(cond, ...)                               \
    do {                                                \
        if (!(cond)) {                                  \
            fprintf(stderr, "FAILED: " __VA_ARGS__);    \
            fprintf(stderr, "\n");                      \
            exit(1);                                    \
        }                                               \
    } while (0)

static size_t numel(int k) { return (size_t)(SHAPES[k][0] * SHAPES[k][1]); }

static void init_weights(void) {
    uint32_t s = 12345u;
    for (int l = 0; l < L; l++)
        for (int k = 0; k < NT; k++) {
            snprintf(NAMES[l][k], sizeof NAMES[l][k], "blocks.%d.%s", l, SUFFIX[k]);
            W[l][k] = malloc(numel(k) * sizeof(float));
            for (size_t i = 0; i < numel(k); i++) {
                s ^= s << 13; s ^= s >> 17; s ^= s << 5;
                W[l][k][i] = ((float)(s % 2001u) - 1000.0f) * 1e-4f;
            }
        }
}

static void init_input(float x[T][D]) {
    for (int t = 0; t < T; t++)
        for (int i = 0; i < D; i++) x[t][i] = (float)((t * 7 + i * 3) % 11) / 11.0f - 0.5f;
}

/* One residual block on the CPU. */
static void block(float *const w[NT], float x[T][D]) {
    float h[H];
    for (int t = 0; t < T; t++) {
        for (int j = 0; j < H; j++) {
            float a = w[1][j];
            for (int i = 0; i < D; i++) a += w[0][j * D + i] * x[t][i];
            h[j] = a > 0.0f ? a : 0.01f * a;
        }
        float y[D];
        for (int k = 0; k < D; k++) {
            float a = w[3][k];
            for (int j = 0; j < H; j++) a += w[2][k * H + j] * h[j];
            y[k] = a;
        }
        for (int k = 0; k < D; k++) x[t][k] += y[k];
    }
}

static uint64_t weight_bytes(void) {
    uint64_t b = 0;
    for (int k = 0; k < NT; k++) b += numel(k) * sizeof(float);
    return b * L;
}

/* A safetensors file: 8-byte little-endian header length, JSON header, data. */
static void write_safetensors(const char *path) {
    char header[8192];
    size_t n = 0, off = 0;
    n += snprintf(header + n, sizeof header - n, "{");
    for (int l = 0; l < L; l++)
        for (int k = 0; k < NT; k++) {
            size_t bytes = numel(k) * sizeof(float);
            n += snprintf(header + n, sizeof header - n,
                          "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%llu,%llu],\"data_offsets\":[%zu,%zu]}",
                          (l || k) ? "," : "", NAMES[l][k], (unsigned long long)SHAPES[k][0],
                          (unsigned long long)SHAPES[k][1], off, off + bytes);
            off += bytes;
        }
    n += snprintf(header + n, sizeof header - n, "}");
    while (n % 8) header[n++] = ' ';
    FILE *f = fopen(path, "wb");
    EXPECT(f, "cannot write %s", path);
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)n >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, n, f);
    for (int l = 0; l < L; l++)
        for (int k = 0; k < NT; k++) fwrite(W[l][k], sizeof(float), numel(k), f);
    fclose(f);
}

enum source { FROM_FILE, FROM_FILE_IN_PLACE, FROM_BUFFERS };

/* Runs `passes` passes through Ferry; every pass must give the same output, returned in `out`. */
static void run(FerryDevice *dev, FerryMode mode, uint64_t budget, enum source src,
                const char *file, int declare_order, int passes, float out[T][D],
                const char *dir, FerryPlanSummary *plan) {
    FerryModel *model = NULL;
    CHECK(ferry_model_new(dev, &model));
    if (src != FROM_BUFFERS) {
        size_t n = 0;
        CHECK(ferry_model_add_file(model, file, NULL, src == FROM_FILE_IN_PLACE ? FERRY_IN_PLACE : 0, &n));
        EXPECT(n == L * NT, "file holds %zu tensors", n);
    } else {
        for (int l = 0; l < L; l++)
            for (int k = 0; k < NT; k++)
                CHECK(ferry_model_add_buffer(model, NAMES[l][k], FERRY_DTYPE_F32, SHAPES[k], 2,
                                             W[l][k], numel(k) * sizeof(float), 0));
    }
    uint32_t order[L];
    for (int l = 0; l < L; l++) {
        const char *names[NT];
        char group[32];
        for (int k = 0; k < NT; k++) names[k] = NAMES[l][k];
        snprintf(group, sizeof group, "blocks.%d", l);
        CHECK(ferry_model_add_group(model, group, "mlp", names, NT, COMPUTE_NS, &order[l]));
    }
    if (declare_order) CHECK(ferry_model_set_order(model, order, L));

    FerrySchedulerConfig cfg = ferry_scheduler_config_default(mode, budget);
    FerryScheduler *s = NULL;
    CHECK(ferry_scheduler_new(model, &cfg, &s));
    CHECK(ferry_model_free(model)); /* the scheduler keeps what it needs */

    static float scratch[NT][H * D];
    for (int p = 0; p < passes; p++) {
        float x[T][D];
        init_input(x);
        CHECK(ferry_begin_pass(s));
        for (int l = 0; l < L; l++) {
            FerryTensor view[NT];
            size_t n = 0;
            CHECK(ferry_acquire(s, (uint32_t)l, view, NT, &n));
            EXPECT(n == NT, "group %d has %zu tensors", l, n);
            float *w[NT];
            for (int k = 0; k < NT; k++) {
                EXPECT(view[k].bytes == numel(k) * sizeof(float), "tensor size");
                CHECK(ferry_scheduler_read(s, view[k].ptr, scratch[k], (size_t)view[k].bytes));
                w[k] = scratch[k];
            }
            CHECK(ferry_scheduler_busy(s, COMPUTE_NS)); /* the modelled kernel time */
            block(w, x);
            CHECK(ferry_release(s, (uint32_t)l));
        }
        CHECK(ferry_end_pass(s));
        if (p == 0)
            memcpy(out, x, sizeof x);
        else
            EXPECT(memcmp(out, x, sizeof x) == 0, "pass %d differs from pass 0", p);
    }
    if (plan) CHECK(ferry_scheduler_plan_summary(s, plan));
    if (dir) {
        size_t len = 0;
        CHECK(ferry_scheduler_plan(s, NULL, 0, &len));
        char *text = malloc(len + 1);
        CHECK(ferry_scheduler_plan(s, text, len + 1, &len));
        printf("%s\n", text);
        free(text);
        CHECK(ferry_scheduler_metrics(s, NULL, 0, &len));
        text = malloc(len + 1);
        CHECK(ferry_scheduler_metrics(s, text, len + 1, &len));
        printf("%s\n", text);
        free(text);
        char path[4096];
        snprintf(path, sizeof path, "%s/trace.json", dir);
        CHECK(ferry_scheduler_write_trace(s, path));
        snprintf(path, sizeof path, "%s/metrics.txt", dir);
        CHECK(ferry_scheduler_write_metrics(s, path));
    }
    CHECK(ferry_scheduler_free(s));
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    char file[4096];
    snprintf(file, sizeof file, "%s/mlp.safetensors", dir);
    init_weights();
    write_safetensors(file);
    const uint64_t total = weight_bytes();
    const uint64_t small = total * 2 / 5; /* 40 % of the weights */

    /* The plain CPU run. */
    float cpu[T][D];
    init_input(cpu);
    for (int l = 0; l < L; l++) block(W[l], cpu);

    FerryDevice *dev = NULL;
    CHECK(ferry_device_open_sim(0, &dev));

    float resident[T][D], out[T][D];
    run(dev, FERRY_MODE_NONE, 2 * total, FROM_FILE, file, 1, 2, resident, NULL, NULL);
    EXPECT(memcmp(resident, cpu, sizeof cpu) == 0, "resident run differs from the CPU run");

    FerryPlanSummary plan;
    printf("weights %llu bytes in %d blocks, budget %llu bytes\n", (unsigned long long)total, L,
           (unsigned long long)small);
    run(dev, FERRY_MODE_AUTO, small, FROM_BUFFERS, NULL, 1, 3, out, dir, &plan);
    EXPECT(plan.streamed_bytes_per_pass > 0, "auto under a small budget streams nothing");
    EXPECT(memcmp(out, resident, sizeof out) == 0, "auto (buffers) differs from resident");

    run(dev, FERRY_MODE_AUTO, small, FROM_FILE, file, 1, 2, out, NULL, NULL);
    EXPECT(memcmp(out, resident, sizeof out) == 0, "auto (file) differs from resident");
    run(dev, FERRY_MODE_GROUP, small, FROM_FILE_IN_PLACE, file, 1, 2, out, NULL, NULL);
    EXPECT(memcmp(out, resident, sizeof out) == 0, "group (file in place) differs from resident");
    run(dev, FERRY_MODE_SEQUENTIAL, small, FROM_BUFFERS, NULL, 1, 2, out, NULL, NULL);
    EXPECT(memcmp(out, resident, sizeof out) == 0, "sequential differs from resident");
    run(dev, FERRY_MODE_AUTO, small, FROM_FILE, file, 0, 3, out, NULL, &plan);
    EXPECT(memcmp(out, resident, sizeof out) == 0, "traced order differs from resident");
    EXPECT(plan.streamed_bytes_per_pass > 0, "traced plan streams nothing");

    /* A perturbed weight must show in the output (the comparison can fail). */
    W[3][0][5] += 1e-3f;
    run(dev, FERRY_MODE_AUTO, small, FROM_BUFFERS, NULL, 1, 2, out, NULL, NULL);
    EXPECT(memcmp(out, resident, sizeof out) != 0, "a perturbed weight did not change the output");
    W[3][0][5] -= 1e-3f;

    /* Errors are status codes with a message. */
    FerryModel *m = NULL;
    CHECK(ferry_model_new(dev, &m));
    CHECK(ferry_model_add_file(m, file, NULL, 0, NULL));
    const char *names[NT] = {NAMES[0][0], NAMES[0][1], NAMES[0][2], NAMES[0][3]};
    CHECK(ferry_model_add_group(m, "blocks.0", NULL, names, NT, COMPUTE_NS, NULL));
    const char *missing[1] = {"blocks.0.nope"};
    EXPECT(ferry_model_add_group(m, "x", NULL, missing, 1, 0, NULL) == FERRY_STATUS_INVALID_ARGUMENT,
           "unknown tensor accepted");
    printf("unknown tensor: %s\n", ferry_last_error());
    FerrySchedulerConfig tiny = ferry_scheduler_config_default(FERRY_MODE_NONE, 4096);
    FerryScheduler *s = NULL;
    EXPECT(ferry_scheduler_new(m, &tiny, &s) == FERRY_STATUS_BUDGET_TOO_SMALL, "tiny budget accepted");
    printf("tiny budget: %s\n", ferry_last_error());
    CHECK(ferry_model_free(m));
    EXPECT(ferry_model_free(m) == FERRY_STATUS_INVALID_HANDLE, "double free accepted");
    printf("double free: %s\n", ferry_last_error());
    EXPECT(ferry_model_add_file(m, file, NULL, 0, NULL) == FERRY_STATUS_INVALID_HANDLE,
           "use after free accepted");

    FerryDevice *gpu = NULL;
    FerryStatus st = ferry_device_open_cuda(0, &gpu);
    printf("CUDA device 0: %s%s%s\n", ferry_status_name(st), st ? ": " : "", st ? ferry_last_error() : "");
    if (st == FERRY_STATUS_OK) CHECK(ferry_device_free(gpu));

    CHECK(ferry_device_free(dev));
    for (int l = 0; l < L; l++)
        for (int k = 0; k < NT; k++) free(W[l][k]);
    printf("mlp example: streamed runs bit-identical to the resident run: OK\n");
    return 0;
}
