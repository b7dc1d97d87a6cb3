#!/usr/bin/env python3
"""Prints the reference values used by test_random.cpp.

A straight transcription of the published C reference implementations of
SplitMix64 and xoshiro256** 1.0 (prng.di.unimi.it) in Python's exact integer
arithmetic, independent of Rhine's C++.  Run: python3 tests/core/random_reference.py
"""
M = (1 << 64) - 1


def splitmix64(state):
    state = (state + 0x9E3779B97F4A7C15) & M
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return state, z ^ (z >> 31)


def rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & M


def xoshiro256ss(s):
    result = (rotl((s[1] * 5) & M, 7) * 9) & M
    t = (s[1] << 17) & M
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = rotl(s[3], 45)
    return result


st = 1234567
out = []
for _ in range(5):
    st, v = splitmix64(st)
    out.append(v)
print("splitmix64(1234567):", out)
s = [1, 2, 3, 4]
print("xoshiro256** from {1,2,3,4}:", [xoshiro256ss(s) for _ in range(6)])
