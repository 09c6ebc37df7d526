// Closes the AVX-512 variant opened by isa_avx512_begin.h: what the compiler
// generates after the kernel file (the registrations' load-time code) is
// baseline code again.
#pragma GCC pop_options
