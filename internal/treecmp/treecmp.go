// Package treecmp compares two directory trees the way the end-to-end
// tests need: a source tree and what the kernel shows after mounting the
// image built from it. It records, per path, the type, permission bits
// (setuid/setgid/sticky included), owner, size, mtime, sha256 of regular
// files, symlink targets, device numbers, xattrs and hardlink groups, and
// reports every difference.
package treecmp

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// Entry is what is compared for one path.
type Entry struct {
	Path      string
	Type      string // reg, dir, symlink, chr, blk, fifo, sock
	Perm      uint32 // mode & 07777
	UID, GID  uint32
	Size      int64 // not for directories (their st_size is filesystem-specific)
	MtimeNsec int64 // not compared for symlinks unless Options.SymlinkMtime
	SHA256    string
	Target    string
	Rdev      uint64
	Xattrs    map[string]string
	LinkGroup string // first path (sorted) of the hardlink group, "" when nlink is 1
}

// Options select what to leave out.
type Options struct {
	IgnoreMtime  bool
	IgnoreXattrs bool
	// XattrPrefixes restricts compared xattrs; default user., trusted., security.
	XattrPrefixes []string
	// SkipRoot leaves out the root directory's own metadata.
	SkipRoot bool
}

// Scan walks root without following symlinks.
func Scan(root string, opts Options) (map[string]*Entry, error) {
	prefixes := opts.XattrPrefixes
	if prefixes == nil {
		prefixes = []string{"user.", "trusted.", "security."}
	}
	entries := map[string]*Entry{}
	inodes := map[[2]uint64][]string{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if rel == "." && opts.SkipRoot {
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return err
		}
		e := &Entry{Path: rel, Perm: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid, MtimeNsec: st.Mtim.Nano()}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			e.Type, e.Size = "reg", st.Size
			sum, err := fileSHA256(path)
			if err != nil {
				return err
			}
			e.SHA256 = sum
		case unix.S_IFDIR:
			e.Type = "dir"
		case unix.S_IFLNK:
			e.Type, e.Size = "symlink", st.Size
			if e.Target, err = os.Readlink(path); err != nil {
				return err
			}
		case unix.S_IFCHR:
			e.Type, e.Rdev = "chr", st.Rdev
		case unix.S_IFBLK:
			e.Type, e.Rdev = "blk", st.Rdev
		case unix.S_IFIFO:
			e.Type = "fifo"
		case unix.S_IFSOCK:
			e.Type = "sock"
		default:
			return fmt.Errorf("treecmp: %s: unknown file type %#o", path, st.Mode)
		}
		if e.Type != "dir" && st.Nlink > 1 {
			key := [2]uint64{st.Dev, st.Ino}
			inodes[key] = append(inodes[key], rel)
		}
		if !opts.IgnoreXattrs {
			if e.Xattrs, err = Xattrs(path, prefixes); err != nil {
				return err
			}
		}
		entries[rel] = e
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, paths := range inodes {
		if len(paths) < 2 {
			continue
		}
		sort.Strings(paths)
		for _, p := range paths {
			entries[p].LinkGroup = paths[0]
		}
	}
	return entries, nil
}

// Compare scans both trees and returns one line per difference, sorted.
func Compare(want, got string, opts Options) ([]string, error) {
	w, err := Scan(want, opts)
	if err != nil {
		return nil, err
	}
	g, err := Scan(got, opts)
	if err != nil {
		return nil, err
	}
	return Diff(w, g, opts), nil
}

// Diff reports how got differs from want.
func Diff(want, got map[string]*Entry, opts Options) []string {
	var diffs []string
	add := func(format string, args ...any) { diffs = append(diffs, fmt.Sprintf(format, args...)) }
	for path, w := range want {
		g, ok := got[path]
		if !ok {
			add("%s: missing", path)
			continue
		}
		if w.Type != g.Type {
			add("%s: type %s, want %s", path, g.Type, w.Type)
			continue
		}
		// Symlink permissions are always 0777 on Linux; nothing to compare.
		if w.Type != "symlink" && w.Perm != g.Perm {
			add("%s: mode %#o, want %#o", path, g.Perm, w.Perm)
		}
		if w.UID != g.UID || w.GID != g.GID {
			add("%s: owner %d:%d, want %d:%d", path, g.UID, g.GID, w.UID, w.GID)
		}
		if w.Type != "dir" && w.Size != g.Size {
			add("%s: size %d, want %d", path, g.Size, w.Size)
		}
		if w.SHA256 != g.SHA256 {
			add("%s: content sha256 %s, want %s", path, g.SHA256, w.SHA256)
		}
		if w.Target != g.Target {
			add("%s: symlink target %q, want %q", path, g.Target, w.Target)
		}
		if w.Rdev != g.Rdev {
			add("%s: rdev %#x, want %#x", path, g.Rdev, w.Rdev)
		}
		if !opts.IgnoreMtime && w.Type != "symlink" && w.MtimeNsec != g.MtimeNsec {
			add("%s: mtime %d ns, want %d ns", path, g.MtimeNsec, w.MtimeNsec)
		}
		if w.LinkGroup != g.LinkGroup {
			add("%s: hardlink group %q, want %q", path, g.LinkGroup, w.LinkGroup)
		}
		if !opts.IgnoreXattrs && fmt.Sprint(sortedMap(w.Xattrs)) != fmt.Sprint(sortedMap(g.Xattrs)) {
			add("%s: xattrs %v, want %v", path, sortedMap(g.Xattrs), sortedMap(w.Xattrs))
		}
	}
	for path := range got {
		if _, ok := want[path]; !ok {
			add("%s: unexpected", path)
		}
	}
	sort.Strings(diffs)
	return diffs
}

// Summary formats at most max differences for a test failure.
func Summary(diffs []string, max int) string {
	if len(diffs) <= max {
		return strings.Join(diffs, "\n")
	}
	return strings.Join(diffs[:max], "\n") + fmt.Sprintf("\n... and %d more", len(diffs)-max)
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("treecmp: reading %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Xattrs returns the extended attributes of path (not following a
// symlink) whose names start with one of prefixes, or all with nil.
func Xattrs(path string, prefixes []string) (map[string]string, error) {
	size, err := unix.Llistxattr(path, nil)
	if errors.Is(err, unix.ENOTSUP) || size == 0 {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("treecmp: listxattr %s: %w", path, err)
	}
	buf := make([]byte, size)
	n, err := unix.Llistxattr(path, buf)
	if err != nil {
		return nil, fmt.Errorf("treecmp: listxattr %s: %w", path, err)
	}
	out := map[string]string{}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		keep := prefixes == nil
		for _, p := range prefixes {
			keep = keep || strings.HasPrefix(name, p)
		}
		if !keep {
			continue
		}
		vsize, err := unix.Lgetxattr(path, name, nil)
		if err != nil {
			return nil, fmt.Errorf("treecmp: getxattr %s %s: %w", path, name, err)
		}
		val := make([]byte, vsize)
		if vsize > 0 {
			if vsize, err = unix.Lgetxattr(path, name, val); err != nil {
				return nil, fmt.Errorf("treecmp: getxattr %s %s: %w", path, name, err)
			}
		}
		out[name] = string(val[:vsize])
	}
	if len(out) == 0 {
		return nil, nil
	}
	return out, nil
}

func sortedMap(m map[string]string) []string {
	var kv []string
	for k, v := range m {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return kv
}
