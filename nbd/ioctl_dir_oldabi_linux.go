//go:build linux && (ppc || ppc64 || ppc64le || mips || mipsle || mips64 || mips64le || sparc || sparc64)

package nbd

// powerpc, mips and sparc keep their historical ioctl layout: three
// direction bits from bit 29, and _IOC_NONE is 1.
const (
	ioctlDirNone  = 1
	ioctlDirShift = 29
)
