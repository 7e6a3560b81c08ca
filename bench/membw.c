// Memory read bandwidth: threads sum disjoint parts of a large array, best of several passes.
// Build: cc -O2 -fopenmp membw.c -o membw ; run: ./membw [GiB] [threads]
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    size_t gib = argc > 1 ? strtoul(argv[1], 0, 10) : 4;
    int threads = argc > 2 ? atoi(argv[2]) : omp_get_max_threads();
    size_t n = gib * (1ull << 30) / sizeof(uint64_t);
    uint64_t *a = aligned_alloc(4096, n * sizeof(uint64_t));
    if (!a) { perror("alloc"); return 1; }
    memset(a, 1, n * sizeof(uint64_t));
    double best = 0;
    volatile uint64_t sink = 0;
    for (int pass = 0; pass < 5; pass++) {
        double t0 = omp_get_wtime();
        uint64_t total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
        for (size_t i = 0; i < n; i++) total += a[i];
        double dt = omp_get_wtime() - t0;
        sink += total;
        double gbs = n * sizeof(uint64_t) / dt / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("%.2f\n", best);
    return (int)(sink & 0);
}
