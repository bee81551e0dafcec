// Package testtree makes the realistic source trees the end-to-end tests
// build images from: everything a container rootfs can hold, a few
// thousand entries, deterministic contents and timestamps.
package testtree

import (
	"archive/tar"
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/treecmp"
)

// Make fills dir with everything a container rootfs can hold
// (about 2,700 entries) and returns the number of entries. Needs root for
// devices, ownership and trusted./security. xattrs.
func Make(t testing.TB, dir string) int {
	t.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	var created []string
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	p := func(rel string) string { return filepath.Join(dir, rel) }
	mkdir := func(rel string, perm uint32) {
		t.Helper()
		must(os.MkdirAll(p(rel), 0o755))
		must(unix.Chmod(p(rel), perm))
		created = append(created, rel)
	}
	file := func(rel string, data []byte) {
		t.Helper()
		must(os.WriteFile(p(rel), data, 0o644))
		created = append(created, rel)
	}
	symlink := func(rel, target string) {
		t.Helper()
		must(os.Symlink(target, p(rel)))
		created = append(created, rel)
	}
	link := func(rel, existing string) {
		t.Helper()
		must(os.Link(p(existing), p(rel)))
	}

	// A directory of more than one block of entries, with repeated
	// contents for deduplication.
	mkdir("bigdir", 0o755)
	for i := range 2000 {
		name := fmt.Sprintf("bigdir/entry-%04d-%s", i, strings.Repeat("x", i%40))
		switch {
		case i%5 == 0:
			symlink(name, fmt.Sprintf("entry-%04d", i+1))
		case i%7 == 0:
			file(name, nil)
		default:
			data := []byte(strings.Repeat(fmt.Sprintf("content %d\n", i%50), 1+i%30))
			file(name, data)
		}
	}

	mkdir("files", 0o755)
	file("files/empty", nil)
	file("files/one", []byte{'1'})
	for _, n := range []int{4095, 4096, 4097, 1<<20 - 1, 1 << 20, 1<<20 + 1} {
		file(fmt.Sprintf("files/size-%d", n), random(n))
	}
	big := random(3<<20 + 512<<10)
	file("files/big", big) // several chunks, contiguous: one extent
	mixed := append(slices.Clone(big[1<<20:2<<20]), random(100000)...)
	file("files/mixed", mixed) // first chunk repeats one of big's: not contiguous
	file("files/incompressible", random(1<<20+100))
	file("files/compressible", []byte(strings.Repeat("the quick brown fox jumps over the lazy dog\n", 50000)))
	f, err := os.Create(p("files/sparse"))
	must(err)
	must(f.Truncate(8 << 20))
	_, err = f.WriteAt([]byte("start"), 0)
	must(err)
	_, err = f.WriteAt([]byte("middle"), 5<<20)
	must(err)
	must(f.Close())
	created = append(created, "files/sparse")

	mkdir("links", 0o755)
	mkdir("other", 0o755)
	file("links/a", random(10000))
	link("links/b", "links/a")
	link("other/c", "links/a")
	file("links/e1", nil)
	link("links/e2", "links/e1")
	symlink("links/s1", "target-of-s1")
	link("links/s2", "links/s1")
	must(unix.Mkfifo(p("links/p1"), 0o600))
	created = append(created, "links/p1")
	link("links/p2", "links/p1")

	mkdir("symlinks", 0o755)
	symlink("symlinks/relative", "../files/one")
	symlink("symlinks/absolute", "/etc/passwd")
	symlink("symlinks/dangling", "does/not/exist")
	symlink("symlinks/dot", ".")
	symlink("symlinks/long1000", strings.Repeat("l", 1000))
	symlink("symlinks/long4000", strings.Repeat("d/", 2000))
	symlink("symlinks/escape", "../../../../../../../etc/shadow")

	mkdir("dev", 0o755)
	for _, d := range []struct {
		name         string
		mode         uint32
		major, minor uint32
	}{{"null", unix.S_IFCHR | 0o666, 1, 3}, {"loop", unix.S_IFBLK | 0o660, 7, 200}, {"wide", unix.S_IFCHR | 0o600, 259, 300000}} {
		must(unix.Mknod(p("dev/"+d.name), d.mode, int(unix.Mkdev(d.major, d.minor))))
		created = append(created, "dev/"+d.name)
	}
	must(unix.Mkfifo(p("dev/fifo"), 0o644))
	created = append(created, "dev/fifo")
	makeSocket(t, p("dev/sock"))
	created = append(created, "dev/sock")

	mkdir("perm", 0o755)
	file("perm/setuid", []byte("#!/bin/true\n"))
	file("perm/owned", []byte("owned"))
	file("perm/owned-wide", []byte("wide ids"))
	file("perm/ro", []byte("ro"))
	file("perm/none", []byte("none"))
	file("perm/mtime0", []byte("compact inode"))
	mkdir("perm/setgid", 0o755)
	mkdir("perm/sticky", 0o755)
	must(os.Lchown(p("perm/owned"), 1234, 5678))
	must(os.Lchown(p("perm/owned-wide"), 70000, 80000))
	must(os.Lchown(p("perm/setgid"), 1234, 5678))
	must(os.Lchown(p("symlinks/relative"), 4321, 8765))
	must(unix.Chmod(p("perm/setuid"), 0o4755))
	must(unix.Chmod(p("perm/ro"), 0o400))
	must(unix.Chmod(p("perm/none"), 0))
	must(unix.Chmod(p("perm/setgid"), 0o2775))
	must(unix.Chmod(p("perm/sticky"), 0o1777))

	mkdir("xattr", 0o750)
	file("xattr/file", []byte("with xattrs"))
	file("xattr/many", nil)
	file("xattr/acl", []byte("acl"))
	symlink("xattr/symlink", "file")
	setx := func(rel, name string, v []byte) {
		t.Helper()
		if err := unix.Lsetxattr(p(rel), name, v, 0); err != nil {
			t.Fatalf("setxattr %s %s: %v", rel, name, err)
		}
	}
	setx("xattr/file", "user.foo", []byte("bar"))
	setx("xattr/file", "trusted.t", []byte("trusted value"))
	setx("xattr/file", "security.s", []byte("security value"))
	setx("xattr/file", "user.empty", nil)
	setx("xattr/file", "user.big", random(3000))
	for i := range 20 {
		setx("xattr/many", fmt.Sprintf("user.n%02d", i), []byte(strings.Repeat("v", i)))
	}
	setx("xattr", "user.dir", []byte("on a directory"))
	setx("xattr/symlink", "trusted.sym", []byte("on a symlink"))
	setx("files/big", "user.big-file", []byte("xattr and chunks"))
	// POSIX ACL: user::rw- user:1234:r-- group::r-- mask::r-- other::r--
	acl := []byte{2, 0, 0, 0}
	for _, e := range []struct {
		tag, perm uint16
		id        uint32
	}{{0x01, 6, ^uint32(0)}, {0x02, 4, 1234}, {0x04, 4, ^uint32(0)}, {0x10, 4, ^uint32(0)}, {0x20, 4, ^uint32(0)}} {
		acl = binary.LittleEndian.AppendUint16(acl, e.tag)
		acl = binary.LittleEndian.AppendUint16(acl, e.perm)
		acl = binary.LittleEndian.AppendUint32(acl, e.id)
	}
	setx("xattr/acl", "system.posix_acl_access", acl)

	mkdir("names", 0o755)
	file("names/"+strings.Repeat("n", 255), []byte("long name"))
	mkdir("names/"+strings.Repeat("D", 255), 0o755)
	file("names/"+strings.Repeat("D", 255)+"/"+strings.Repeat("f", 255), []byte("long names"))
	for _, n := range []string{"!bang", "-dash", "#hash", " space", "naïve-файл", ".hidden", "..dots", "a.b"} {
		file("names/"+n, []byte(n))
	}

	deep := "deep"
	mkdir(deep, 0o755)
	for i := range 30 {
		deep += fmt.Sprintf("/level-%02d-%s", i, strings.Repeat("y", 30))
		mkdir(deep, 0o755)
	}
	file(deep+"/bottom", []byte("deep file"))

	mkdir("manydirs", 0o755)
	for i := range 300 {
		d := fmt.Sprintf("manydirs/d%03d", i)
		mkdir(d, 0o755)
		file(d+"/f", []byte(d))
	}

	// Timestamps last, children before parents, so creating entries does
	// not disturb them.
	slices.SortFunc(created, func(a, b string) int { return len(b) - len(a) })
	created = append(created, ".")
	for i, rel := range created {
		mt := unix.NsecToTimespec(time.Date(2023, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano() + int64(i)*1_234_567_891)
		if rel == "perm/mtime0" {
			mt = unix.Timespec{}
		}
		must(unix.UtimesNanoAt(unix.AT_FDCWD, p(rel), []unix.Timespec{mt, mt}, unix.AT_SYMLINK_NOFOLLOW))
	}
	return len(created)
}

func makeSocket(t testing.TB, path string) {
	t.Helper()
	// Socket paths are limited to 108 bytes: bind somewhere short, then
	// move the socket into place.
	short, err := os.MkdirTemp("", "sk")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(short)
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: filepath.Join(short, "s")}); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(short, "s"), path); err != nil {
		t.Fatal(err)
	}
}

// WriteTar writes a PAX tar of dir (sorted, "./" first, hard links as
// link entries, xattrs as SCHILY.xattr records, sockets left out) to w.
func WriteTar(t testing.TB, dir string, w io.Writer) {
	t.Helper()
	tw := tar.NewWriter(w)
	firstName := make(map[uint64]string)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return err
		}
		hdr := &tar.Header{
			Name:    rel,
			Mode:    int64(st.Mode & 0o7777),
			Uid:     int(st.Uid),
			Gid:     int(st.Gid),
			ModTime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
			Format:  tar.FormatPAX,
		}
		x, err := treecmp.Xattrs(path, nil)
		if err != nil {
			return err
		}
		if len(x) > 0 {
			hdr.PAXRecords = make(map[string]string)
			for k, v := range x {
				hdr.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR && st.Nlink > 1 {
			if first, ok := firstName[st.Ino]; ok {
				hdr.Typeflag, hdr.Linkname = tar.TypeLink, first
				hdr.PAXRecords = nil
				return tw.WriteHeader(hdr)
			}
			firstName[st.Ino] = rel
		}
		var data []byte
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			hdr.Typeflag, hdr.Name = tar.TypeDir, rel+"/"
		case unix.S_IFREG:
			hdr.Typeflag = tar.TypeReg
			if data, err = os.ReadFile(path); err != nil {
				return err
			}
			hdr.Size = int64(len(data))
		case unix.S_IFLNK:
			hdr.Typeflag = tar.TypeSymlink
			if hdr.Linkname, err = os.Readlink(path); err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			hdr.Typeflag = map[uint32]byte{unix.S_IFCHR: tar.TypeChar, unix.S_IFBLK: tar.TypeBlock}[st.Mode&unix.S_IFMT]
			hdr.Devmajor, hdr.Devminor = int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
		case unix.S_IFIFO:
			hdr.Typeflag = tar.TypeFifo
		case unix.S_IFSOCK:
			return nil
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		_, err = tw.Write(data)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
}
