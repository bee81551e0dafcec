package nbd

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// kernelTestDevice is a zero-filled device of a given size.
type kernelTestDevice struct{ size int64 }

func (d kernelTestDevice) Size() int64 { return d.size }
func (d kernelTestDevice) ReadAt(p []byte, off int64) (int, error) {
	clear(p)
	return len(p), nil
}

func TestParseDevice(t *testing.T) {
	good := map[string]int{"/dev/nbd0": 0, "nbd15": 15, "3": 3, "auto": AnyDevice, "": AnyDevice, "/dev/nbd128": 128}
	for in, want := range good {
		got, err := ParseDevice(in)
		if err != nil || got != want {
			t.Errorf("ParseDevice(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"/dev/sda", "nbd", "nbd-1", "/dev/nbd1p1", "nbd01", "x", "-1", "/dev/nbd 1"} {
		if got, err := ParseDevice(in); err == nil {
			t.Errorf("ParseDevice(%q) = %d, want an error", in, got)
		}
	}
	if DevicePath(7) != "/dev/nbd7" {
		t.Errorf("DevicePath(7) = %q", DevicePath(7))
	}
}

func TestKernelOptionsValidate(t *testing.T) {
	dev := kernelTestDevice{size: 1 << 20}
	ok := []KernelOptions{
		{Index: AnyDevice},
		{Index: 3, Connections: 4, BlockSize: 512, Timeout: 30 * time.Second, DeadConnTimeout: time.Minute, BackendID: "x"},
		{Index: 0, BlockSize: 65536},
	}
	for i, o := range ok {
		if err := o.validate(dev); err != nil {
			t.Errorf("options %d: %v", i, err)
		}
	}
	bad := map[string]KernelOptions{
		"negative index":        {Index: -2},
		"too many connections":  {Index: AnyDevice, Connections: maxKernelConnections + 1},
		"block size 1000":       {Index: AnyDevice, BlockSize: 1000},
		"block size 256":        {Index: AnyDevice, BlockSize: 256},
		"block size 128K":       {Index: AnyDevice, BlockSize: 128 << 10},
		"sub-second timeout":    {Index: AnyDevice, Timeout: 1500 * time.Millisecond},
		"negative dead timeout": {Index: AnyDevice, DeadConnTimeout: -time.Second},
		"NUL in backend":        {Index: AnyDevice, BackendID: "a\x00b"},
		"huge backend":          {Index: AnyDevice, BackendID: strings.Repeat("x", maxBackendIDLength+1)},
	}
	for name, o := range bad {
		if err := o.validate(dev); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	o := KernelOptions{Index: AnyDevice}
	if err := o.validate(kernelTestDevice{size: 4096 + 512}); err == nil {
		t.Error("a size that is not a multiple of the 4096 default block size was accepted")
	}
	o = KernelOptions{Index: AnyDevice, BlockSize: 512}
	if err := o.validate(kernelTestDevice{size: 4096 + 512}); err != nil {
		t.Errorf("a 512-aligned size with 512-byte blocks: %v", err)
	}
	if err := o.validate(kernelTestDevice{size: 0}); err == nil {
		t.Error("an empty device was accepted")
	}
	if err := o.validate(nil); err == nil {
		t.Error("a nil device was accepted")
	}
}

// fakeSysBlock builds a /sys/block lookalike: nbdN directories with the
// given files.
func fakeSysBlock(t *testing.T, devices map[int]map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for index, files := range devices {
		dir := filepath.Join(root, "nbd"+strconv.Itoa(index))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, content := range files {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Devices that are not NBD must be ignored.
	if err := os.MkdirAll(filepath.Join(root, "sda"), 0o755); err != nil {
		t.Fatal(err)
	}
	return root
}

func TestSysfsLookups(t *testing.T) {
	// Pids above the kernel's pid_max (2^22) name no thread, so threadGroup
	// leaves them as they are.
	root := fakeSysBlock(t, map[int]map[string]string{
		0:  {"size": "4584\n", "pid": "99999321\n", "backend": "rafsnbd:disk:/a\n"},
		1:  {"size": "0\n"},
		10: {"size": "8\n", "backend": "other\n"},
		2:  {"size": "4584\n", "pid": "99999400\n"},
	})
	indexes, err := sysfsIndexes(root)
	if err != nil {
		t.Fatal(err)
	}
	if want := []int{0, 1, 2, 10}; !slices.Equal(indexes, want) {
		t.Errorf("indexes = %v, want %v (numeric order)", indexes, want)
	}
	d0 := sysfsDevice{root, 0}
	if size, err := d0.sizeBytes(); err != nil || size != 4584*512 {
		t.Errorf("size = %d, %v; want %d (sectors × 512)", size, err, 4584*512)
	}
	if d0.pid() != 99999321 || (sysfsDevice{root, 1}).pid() != 0 {
		t.Error("pid lookups wrong")
	}
	if id, ok := d0.backend(); !ok || id != "rafsnbd:disk:/a" {
		t.Errorf("backend = %q, %v", id, ok)
	}
	if _, ok := (sysfsDevice{root, 2}).backend(); ok {
		t.Error("a device without a backend file reports one")
	}

	if idx, ok := findByBackend(root, "rafsnbd:disk:/a", AnyDevice); !ok || idx != 0 {
		t.Errorf("findByBackend(any) = %d, %v; want 0", idx, ok)
	}
	if idx, ok := findByBackend(root, "other", AnyDevice); !ok || idx != 10 {
		t.Errorf("findByBackend(other) = %d, %v; want 10", idx, ok)
	}
	if _, ok := findByBackend(root, "other", 0); ok {
		t.Error("findByBackend with an explicit index matched another device")
	}
	if _, ok := findByBackend(root, "rafsnbd:disk:/", AnyDevice); ok {
		t.Error("a prefix of an identifier matched")
	}
	if _, ok := findByBackend(root, "", AnyDevice); ok {
		t.Error("the empty identifier matched")
	}
}

func TestWaitReady(t *testing.T) {
	root := fakeSysBlock(t, map[int]map[string]string{4: {"size": "0\n"}})
	d := sysfsDevice{root, 4}
	ctx := context.Background()

	// The capacity appears after a while, as the driver commits it.
	go func() {
		time.Sleep(60 * time.Millisecond)
		_ = os.WriteFile(d.path("size"), []byte("16\n"), 0o644)
	}()
	if err := waitReady(ctx, d, 16*512, false, 10*time.Second, nil); err != nil {
		t.Fatalf("size appeared but waitReady said %v", err)
	}
	// The ioctl path also needs the session pid file.
	if err := waitReady(ctx, d, 16*512, true, 100*time.Millisecond, nil); err == nil {
		t.Fatal("ready without a pid file")
	}
	if err := waitReady(ctx, d, 32*512, false, 100*time.Millisecond, nil); err == nil || !strings.Contains(err.Error(), "want 16384") {
		t.Fatalf("wrong size: %v", err)
	}
	ended := make(chan struct{})
	close(ended)
	if err := waitReady(ctx, d, 32*512, false, 10*time.Second, ended); err == nil {
		t.Fatal("a session that ended is not an error")
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := waitReady(cctx, d, 32*512, false, 10*time.Second, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
}

// Without the nbd driver every entry point must say so, with the hint, and
// touch nothing. This runs against the real kernel: on a host that has the
// driver it cannot be exercised (the VM test covers the other side).
func TestKernelWithoutNBDModule(t *testing.T) {
	if nbdModuleLoaded() {
		t.Skip("the nbd driver is loaded on this host; the missing-driver path needs a host without it")
	}
	if _, err := dialNBDNetlink(); !errors.Is(err, errNLFamilyMissing) {
		// Not root, or netlink unavailable: AttachKernel must still fall
		// through to the sysfs check below.
		t.Logf("netlink family lookup: %v", err)
	}
	dev := kernelTestDevice{size: 1 << 20}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, useIoctl := range []bool{false, true} {
		a, err := AttachKernel(ctx, dev, KernelOptions{Index: AnyDevice, UseIoctl: useIoctl})
		if a != nil {
			t.Fatalf("ioctl=%v: attached %s without an nbd driver", useIoctl, a.Path)
		}
		if !errors.Is(err, ErrKernelNBDMissing) {
			t.Fatalf("ioctl=%v: error %v, want ErrKernelNBDMissing", useIoctl, err)
		}
		if !strings.Contains(err.Error(), "kernel nbd driver not loaded: modprobe nbd") {
			t.Errorf("ioctl=%v: message %q lacks the modprobe hint", useIoctl, err)
		}
	}
	if _, err := KernelStatus(); !errors.Is(err, ErrKernelNBDMissing) {
		t.Errorf("KernelStatus: %v, want ErrKernelNBDMissing", err)
	}
	if err := DisconnectKernel(0); !errors.Is(err, ErrKernelNBDMissing) {
		t.Errorf("DisconnectKernel: %v, want ErrKernelNBDMissing", err)
	}
}
