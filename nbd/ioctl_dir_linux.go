//go:build linux && !(ppc || ppc64 || ppc64le || mips || mipsle || mips64 || mips64le || sparc || sparc64)

package nbd

// asm-generic/ioctl.h: _IOC_NONE is 0 and the direction bits start at 30.
const (
	ioctlDirNone  = 0
	ioctlDirShift = 30
)
