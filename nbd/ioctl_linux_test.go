//go:build linux

package nbd

import (
	"runtime"
	"testing"
)

// The NBD ioctls are _IO(0xab, n); on the asm-generic layout (amd64, arm64,
// riscv64, s390x, …) that is 0xab00 + n, the numbers nbd-client uses.
func TestIoctlNumbers(t *testing.T) {
	switch runtime.GOARCH {
	case "ppc", "ppc64", "ppc64le", "mips", "mipsle", "mips64", "mips64le", "sparc", "sparc64":
		if got := ioctlRequest(ioctlDoIt); got != 0x2000ab03 {
			t.Errorf("NBD_DO_IT = %#x, want 0x2000ab03 (_IOC_NONE is 1 at bit 29 here)", got)
		}
		return
	}
	want := map[uint]uint{
		ioctlSetSock:       0xab00,
		ioctlSetBlockSize:  0xab01,
		ioctlDoIt:          0xab03,
		ioctlClearSock:     0xab04,
		ioctlClearQueue:    0xab05,
		ioctlSetSizeBlocks: 0xab07,
		ioctlDisconnect:    0xab08,
		ioctlSetTimeout:    0xab09,
		ioctlSetFlags:      0xab0a,
	}
	for nr, w := range want {
		if got := ioctlRequest(nr); got != w {
			t.Errorf("%s = %#x, want %#x", ioctlName(nr), got, w)
		}
	}
}
