package mounter

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// mountErofs mounts the EROFS image in source (a block device, or a
// regular file) read-only on mnt. A regular file is mounted directly
// (file-backed EROFS, kernel 6.12 and later) unless forceLoop; where the
// kernel refuses that, through a loop device, which is returned.
func mountErofs(source, mnt string, isFile, forceLoop bool) (loopDev string, err error) {
	if !isFile {
		if err := unix.Mount(source, mnt, "erofs", unix.MS_RDONLY, ""); err != nil {
			return "", fmt.Errorf("mount -t erofs %s %s: %w", source, mnt, err)
		}
		return "", nil
	}
	if !forceLoop {
		err := unix.Mount(source, mnt, "erofs", unix.MS_RDONLY, "")
		if err == nil {
			return "", nil
		}
		// Kernels without file-backed EROFS look the source up as a block
		// device: ENOTBLK. Anything else is a real failure.
		if !errors.Is(err, unix.ENOTBLK) && !errors.Is(err, unix.EINVAL) {
			return "", fmt.Errorf("mount -t erofs %s %s: %w", source, mnt, err)
		}
	}
	loopDev, hold, err := attachLoop(source)
	if err != nil {
		return "", err
	}
	// Closing hold once the filesystem holds the device arms autoclear;
	// on failure it releases the device at once.
	defer hold.Close()
	if err := unix.Mount(loopDev, mnt, "erofs", unix.MS_RDONLY, ""); err != nil {
		return "", fmt.Errorf("mount -t erofs %s (loop on %s) %s: %w", loopDev, source, mnt, err)
	}
	return loopDev, nil
}

// attachLoop binds file to a free loop device, read-only and with
// autoclear: the kernel releases the device when its last user closes it
// (the filesystem on it is unmounted), even if this process is gone by
// then. The returned open device must be closed only after the mount
// holds it: its close would otherwise be the last one.
func attachLoop(file string) (string, *os.File, error) {
	f, err := os.Open(file)
	if err != nil {
		return "", nil, err
	}
	defer f.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return "", nil, fmt.Errorf("loop device for %s: %w", file, err)
	}
	defer ctl.Close()
	for try := 0; try < 10; try++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", nil, fmt.Errorf("loop device for %s: LOOP_CTL_GET_FREE: %w", file, err)
		}
		dev := "/dev/loop" + strconv.Itoa(n)
		lf, err := os.OpenFile(dev, os.O_RDONLY, 0)
		if err != nil {
			return "", nil, fmt.Errorf("loop device for %s: %w", file, err)
		}
		cfg := unix.LoopConfig{Fd: uint32(f.Fd())}
		cfg.Info.Flags = unix.LO_FLAGS_READ_ONLY | unix.LO_FLAGS_AUTOCLEAR
		copy(cfg.Info.File_name[:], file)
		err = unix.IoctlLoopConfigure(int(lf.Fd()), &cfg)
		if err == nil {
			return dev, lf, nil
		}
		lf.Close()
		if !errors.Is(err, unix.EBUSY) {
			return "", nil, fmt.Errorf("loop device %s for %s: LOOP_CONFIGURE: %w", dev, file, err)
		}
		// Someone took it between GET_FREE and CONFIGURE: take another.
	}
	return "", nil, fmt.Errorf("loop device for %s: every free device was taken meanwhile", file)
}

// detachLoop releases dev if it is still bound to file (autoclear usually
// did it already).
func detachLoop(dev, file string) error {
	name := strings.TrimPrefix(dev, "/dev/")
	b, err := os.ReadFile("/sys/block/" + name + "/loop/backing_file")
	if err != nil {
		return nil // not bound
	}
	if strings.TrimSpace(string(b)) != file {
		return nil // reused by someone else
	}
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("detach %s: %w", dev, err)
	}
	return nil
}

// mountSource returns the source and filesystem type of the mount at path
// (the topmost one), and whether there is one.
func mountSource(path string) (source, fstype string, ok bool) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", "", false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent maj:min root mountpoint opts [optional...] - fstype source superopts
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || unescapeMount(fields[4]) != path {
			continue
		}
		for i := 6; i < len(fields)-2; i++ {
			if fields[i] == "-" {
				source, fstype, ok = unescapeMount(fields[i+2]), fields[i+1], true
				break
			}
		}
	}
	return source, fstype, ok
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmount unmounts path, lazily (MNT_DETACH) when it is busy and lazy is
// set. An absent mount is not an error.
func unmount(path string, lazy bool) error {
	if _, _, ok := mountSource(path); !ok {
		return nil
	}
	err := unix.Unmount(path, 0)
	for i := 0; errors.Is(err, unix.EBUSY) && i < 10; i++ {
		// A reader that just finished may still hold it for a moment.
		time.Sleep(50 * time.Millisecond)
		err = unix.Unmount(path, 0)
	}
	if errors.Is(err, unix.EBUSY) && lazy {
		err = unix.Unmount(path, unix.MNT_DETACH)
	}
	if err != nil && !errors.Is(err, unix.EINVAL) {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("unmount %s: in use (close the files and leave the directory, or stop the processes using it)", path)
		}
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	return nil
}
