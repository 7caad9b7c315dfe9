// Spin kernel: keeps its stream busy for a given GPU wall-clock time and touches no memory.
// It stands in for compute in benchmarks and scheduler tests (Device::busy). Launched with one
// thread; it reads %globaltimer (nanoseconds) until `ns` have passed since it started.

extern "C" __global__ void ferry_busy(unsigned long long ns)
{
    unsigned long long start;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    unsigned long long now = start;
    while (now - start < ns) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    }
}
