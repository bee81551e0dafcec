//go:build amd64 && !purego

#include "textflag.h"

// blocks2 runs the SHA-256 compression function over n 64-byte blocks of
// two independent messages at once, with the SHA extensions. One message's
// rounds form a single dependency chain that keeps SHA256RNDS2 waiting on
// its own latency; interleaving a second chain fills those gaps (see
// sha256x2_amd64.go for the measurement).
//
// state holds both running states in the registers' layout: for each
// message, the words F E B A, then H G D C (lowest lane first).
//
// Registers: X1/X2 ABEF/CDGH and X3-X6 message schedule of the first
// message, X7/X8 and X9-X12 of the second; X0 is the round input
// (W+K, implicit in SHA256RNDS2), X13 the byte-swap mask, X14/X15 scratch.
// The states at the start of a block are kept on the stack.

// Four rounds of each message, with the words m0 and n0.
#define ROUNDS4(koff, m0, n0) \
	VPADDD      koff(AX), m0, X0; \
	SHA256RNDS2 X0, X1, X2;       \
	PSHUFD      $0x0e, X0, X0;    \
	SHA256RNDS2 X0, X2, X1;       \
	VPADDD      koff(AX), n0, X0; \
	SHA256RNDS2 X0, X7, X8;       \
	PSHUFD      $0x0e, X0, X0;    \
	SHA256RNDS2 X0, X8, X7

// The next four schedule words of one message, replacing the oldest (m0)
// with W[t+16..t+19] computed from W[t..t+15] in m0..m3.
#define SCHEDULE(m0, m1, m2, m3, tmp) \
	SHA256MSG1 m1, m0;          \
	VPALIGNR   $4, m2, m3, tmp; \
	PADDD      tmp, m0;         \
	SHA256MSG2 m3, m0

#define ROUNDS4S(koff, m0, m1, m2, m3, n0, n1, n2, n3) \
	ROUNDS4(koff, m0, n0);          \
	SCHEDULE(m0, m1, m2, m3, X14);  \
	SCHEDULE(n0, n1, n2, n3, X15)

#define LOADW(off, base, reg) \
	VMOVDQU off(base), reg; \
	PSHUFB  X13, reg

// func blocks2(state *[16]uint32, p, q *byte, n int)
TEXT ·blocks2(SB), NOSPLIT, $64-32
	MOVQ    state+0(FP), DI
	MOVQ    p+8(FP), SI
	MOVQ    q+16(FP), DX
	MOVQ    n+24(FP), CX
	TESTQ   CX, CX
	JEQ     done
	VMOVDQU 0(DI), X1
	VMOVDQU 16(DI), X2
	VMOVDQU 32(DI), X7
	VMOVDQU 48(DI), X8
	VMOVDQU byteSwap<>(SB), X13
	LEAQ    roundK<>(SB), AX

block:
	VMOVDQU X1, 0(SP)
	VMOVDQU X2, 16(SP)
	VMOVDQU X7, 32(SP)
	VMOVDQU X8, 48(SP)
	LOADW(0, SI, X3)
	LOADW(16, SI, X4)
	LOADW(32, SI, X5)
	LOADW(48, SI, X6)
	LOADW(0, DX, X9)
	LOADW(16, DX, X10)
	LOADW(32, DX, X11)
	LOADW(48, DX, X12)
	ROUNDS4S(0, X3, X4, X5, X6, X9, X10, X11, X12)
	ROUNDS4S(16, X4, X5, X6, X3, X10, X11, X12, X9)
	ROUNDS4S(32, X5, X6, X3, X4, X11, X12, X9, X10)
	ROUNDS4S(48, X6, X3, X4, X5, X12, X9, X10, X11)
	ROUNDS4S(64, X3, X4, X5, X6, X9, X10, X11, X12)
	ROUNDS4S(80, X4, X5, X6, X3, X10, X11, X12, X9)
	ROUNDS4S(96, X5, X6, X3, X4, X11, X12, X9, X10)
	ROUNDS4S(112, X6, X3, X4, X5, X12, X9, X10, X11)
	ROUNDS4S(128, X3, X4, X5, X6, X9, X10, X11, X12)
	ROUNDS4S(144, X4, X5, X6, X3, X10, X11, X12, X9)
	ROUNDS4S(160, X5, X6, X3, X4, X11, X12, X9, X10)
	ROUNDS4S(176, X6, X3, X4, X5, X12, X9, X10, X11)
	ROUNDS4(192, X3, X9)
	ROUNDS4(208, X4, X10)
	ROUNDS4(224, X5, X11)
	ROUNDS4(240, X6, X12)
	VPADDD  0(SP), X1, X1
	VPADDD  16(SP), X2, X2
	VPADDD  32(SP), X7, X7
	VPADDD  48(SP), X8, X8
	ADDQ    $64, SI
	ADDQ    $64, DX
	DECQ    CX
	JNE     block

	VMOVDQU X1, 0(DI)
	VMOVDQU X2, 16(DI)
	VMOVDQU X7, 32(DI)
	VMOVDQU X8, 48(DI)

done:
	RET

// Shuffles each 32-bit word of a message from big-endian to the lanes'
// order.
DATA byteSwap<>+0(SB)/8, $0x0405060700010203
DATA byteSwap<>+8(SB)/8, $0x0c0d0e0f08090a0b
GLOBL byteSwap<>(SB), RODATA|NOPTR, $16

// The 64 round constants of FIPS 180-4, section 4.2.2.
DATA roundK<>+0(SB)/4, $0x428a2f98
DATA roundK<>+4(SB)/4, $0x71374491
DATA roundK<>+8(SB)/4, $0xb5c0fbcf
DATA roundK<>+12(SB)/4, $0xe9b5dba5
DATA roundK<>+16(SB)/4, $0x3956c25b
DATA roundK<>+20(SB)/4, $0x59f111f1
DATA roundK<>+24(SB)/4, $0x923f82a4
DATA roundK<>+28(SB)/4, $0xab1c5ed5
DATA roundK<>+32(SB)/4, $0xd807aa98
DATA roundK<>+36(SB)/4, $0x12835b01
DATA roundK<>+40(SB)/4, $0x243185be
DATA roundK<>+44(SB)/4, $0x550c7dc3
DATA roundK<>+48(SB)/4, $0x72be5d74
DATA roundK<>+52(SB)/4, $0x80deb1fe
DATA roundK<>+56(SB)/4, $0x9bdc06a7
DATA roundK<>+60(SB)/4, $0xc19bf174
DATA roundK<>+64(SB)/4, $0xe49b69c1
DATA roundK<>+68(SB)/4, $0xefbe4786
DATA roundK<>+72(SB)/4, $0x0fc19dc6
DATA roundK<>+76(SB)/4, $0x240ca1cc
DATA roundK<>+80(SB)/4, $0x2de92c6f
DATA roundK<>+84(SB)/4, $0x4a7484aa
DATA roundK<>+88(SB)/4, $0x5cb0a9dc
DATA roundK<>+92(SB)/4, $0x76f988da
DATA roundK<>+96(SB)/4, $0x983e5152
DATA roundK<>+100(SB)/4, $0xa831c66d
DATA roundK<>+104(SB)/4, $0xb00327c8
DATA roundK<>+108(SB)/4, $0xbf597fc7
DATA roundK<>+112(SB)/4, $0xc6e00bf3
DATA roundK<>+116(SB)/4, $0xd5a79147
DATA roundK<>+120(SB)/4, $0x06ca6351
DATA roundK<>+124(SB)/4, $0x14292967
DATA roundK<>+128(SB)/4, $0x27b70a85
DATA roundK<>+132(SB)/4, $0x2e1b2138
DATA roundK<>+136(SB)/4, $0x4d2c6dfc
DATA roundK<>+140(SB)/4, $0x53380d13
DATA roundK<>+144(SB)/4, $0x650a7354
DATA roundK<>+148(SB)/4, $0x766a0abb
DATA roundK<>+152(SB)/4, $0x81c2c92e
DATA roundK<>+156(SB)/4, $0x92722c85
DATA roundK<>+160(SB)/4, $0xa2bfe8a1
DATA roundK<>+164(SB)/4, $0xa81a664b
DATA roundK<>+168(SB)/4, $0xc24b8b70
DATA roundK<>+172(SB)/4, $0xc76c51a3
DATA roundK<>+176(SB)/4, $0xd192e819
DATA roundK<>+180(SB)/4, $0xd6990624
DATA roundK<>+184(SB)/4, $0xf40e3585
DATA roundK<>+188(SB)/4, $0x106aa070
DATA roundK<>+192(SB)/4, $0x19a4c116
DATA roundK<>+196(SB)/4, $0x1e376c08
DATA roundK<>+200(SB)/4, $0x2748774c
DATA roundK<>+204(SB)/4, $0x34b0bcb5
DATA roundK<>+208(SB)/4, $0x391c0cb3
DATA roundK<>+212(SB)/4, $0x4ed8aa4a
DATA roundK<>+216(SB)/4, $0x5b9cca4f
DATA roundK<>+220(SB)/4, $0x682e6ff3
DATA roundK<>+224(SB)/4, $0x748f82ee
DATA roundK<>+228(SB)/4, $0x78a5636f
DATA roundK<>+232(SB)/4, $0x84c87814
DATA roundK<>+236(SB)/4, $0x8cc70208
DATA roundK<>+240(SB)/4, $0x90befffa
DATA roundK<>+244(SB)/4, $0xa4506ceb
DATA roundK<>+248(SB)/4, $0xbef9a3f7
DATA roundK<>+252(SB)/4, $0xc67178f2
GLOBL roundK<>(SB), RODATA|NOPTR, $256
