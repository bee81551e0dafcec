package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/nbd"
)

func init() {
	register(func() *cli.Command {
		return &cli.Command{
			Name:      "serve",
			Usage:     "serve disks read-only to NBD network clients (qemu, nbdinfo, nbdcopy, nbdfuse, nbd-client)",
			ArgsUsage: " ",
			Description: `Serves images composed from their bootstraps and blobs (-B, repeatable, with
blobs from -D, or lazily through --cache-dir from -D or --registry), images
converted by 'rafsnbd convert' (--image REF --cache-dir DIR, repeatable), and
flat disk files (EROFS images such as 'rafsnbd export' writes), as named,
read-only NBD exports until interrupted. Clients speak the
fixed-newstyle NBD protocol; no kernel NBD driver is needed on this side.

  rafsnbd serve --listen unix:/tmp/nbd.sock -B image.boot -D blobs/
  rafsnbd serve --listen unix:/tmp/nbd.sock --disk image.disk
  nbdinfo --list 'nbd+unix:///?socket=/tmp/nbd.sock'
  nbdcopy 'nbd+unix:///image?socket=/tmp/nbd.sock' copy.disk
  qemu-img info nbd://127.0.0.1:10809/image     # with --listen tcp:127.0.0.1:10809

Each image and --disk becomes an export named by the matching --name (in
the order -B images, --image images, --disk files), or by default after the
bootstrap or disk file's base name, or the image reference's tag.
The empty export name (as in 'nbd+unix:///?socket=...') selects the first
export. Once listening, one URI per export is printed on stdout.

NBD has no authentication or encryption here, so by default only a unix
socket or a loopback address is accepted; binding any other address needs
--allow-remote. SIGINT or SIGTERM stops accepting, lets every client's
in-flight reads finish, and exits 0.`,
			Flags: append(append(multiImageFlags(), prefetchFlags()...),
				rootHashFlag(), // issue 12: pins the verity root of a lazily read --image
				&cli.BoolFlag{Name: "fetch-all", Usage: "with --cache-dir: after start, fill the cache with every blob in the background (after the index's prefetch list), at low priority to reads"},
				&cli.StringFlag{Name: "record-trace", Usage: "record the device ranges clients read and write them to `FILE` on exit (for rafsnbd index --prefetch-trace); one image only"},
				&cli.StringFlag{Name: "listen", Value: "tcp:127.0.0.1:10809", Usage: "where to listen: `unix:PATH` or tcp:HOST:PORT (port 0 picks a free one)"},
				&cli.StringSliceFlag{Name: "disk", Usage: "serve this flat disk `FILE` (repeatable)"},
				&cli.StringSliceFlag{Name: "name", Usage: "export `NAME`s, in order: each -B image's, each --image's, then each --disk's (repeatable)"},
				&cli.BoolFlag{Name: "allow-remote", Usage: "allow listening on a non-loopback address (anyone who can connect can read every export)"},
				&cli.IntFlag{Name: "handlers", Usage: "concurrent device reads per connection, `N`; 0 = 4×CPUs"},
				&cli.StringFlag{Name: "cpuprofile", Hidden: true, Usage: "write a pprof CPU profile of the whole run to `FILE` (for scripts/bench-nbd.sh)"},
			),
			Action: runServe,
		}
	})
}

func runServe(ctx context.Context, c *cli.Command) error {
	if err := checkImageFlags(c, true); err != nil {
		return err
	}
	if c.Bool("fetch-all") && c.String("cache-dir") == "" {
		return usagef(c, "--fetch-all fills the blob cache: give --cache-dir DIR too")
	}
	if c.String("record-trace") != "" && len(c.StringSlice("bootstrap"))+len(c.StringSlice("image")) != 1 {
		return usagef(c, "--record-trace records the reads of one image: give one -B or --image")
	}
	log := logger(ctx)
	if path := c.String("cpuprofile"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			return err
		}
		defer func() {
			pprof.StopCPUProfile()
			if err := f.Close(); err != nil {
				log.Warn().Err(err).Msg("writing CPU profile")
			}
		}()
	}
	exports, closeExports, err := serveExports(ctx, c)
	if err != nil {
		return err
	}
	defer func() {
		if err := closeExports(); err != nil {
			log.Warn().Err(err).Msg("closing exports")
		}
	}()

	network, address, err := parseListen(ctx, c.String("listen"), c.Bool("allow-remote"))
	if err != nil {
		return err
	}
	l, err := listen(network, address)
	if err != nil {
		return err
	}
	for _, e := range exports {
		fmt.Fprintln(c.Root().Writer, exportURI(l.Addr(), e.Name))
		log.Info().Str("export", e.Name).Int64("size", e.Device.Size()).Str("uri", exportURI(l.Addr(), e.Name)).Msg("serving")
	}
	srv := &nbd.Server{
		Exports:      exports,
		Logger:       log,
		Transmission: nbd.TransmissionOptions{Handlers: c.Int("handlers")},
	}
	if err := srv.Serve(ctx, l); err != nil {
		return err
	}
	log.Info().Msg("stopped")
	return nil
}

// serveExports turns the command's flags into exports, and returns what
// closes them. It is the one place that knows where exports come from: an
// image composed from its bootstrap and blobs (-B/-D, first), then flat
// disk files (--disk). --name flags name them in that order.
func serveExports(ctx context.Context, c *cli.Command) ([]nbd.Export, func() error, error) {
	var exports []nbd.Export
	var closers []func() error
	closeAll := func() error {
		var errs []error
		for i := len(closers) - 1; i >= 0; i-- {
			errs = append(errs, closers[i]())
		}
		return errors.Join(errs...)
	}
	fail := func(err error) ([]nbd.Export, func() error, error) {
		_ = closeAll()
		return nil, nil, err
	}

	disks, names := c.StringSlice("disk"), c.StringSlice("name")
	sources := make([]string, 0, len(disks)+1) // what each export serves, for messages
	var images []imageSource
	for _, b := range c.StringSlice("bootstrap") {
		images = append(images, imageSource{bootstrap: b})
	}
	for _, r := range c.StringSlice("image") {
		images = append(images, imageSource{ref: r})
	}
	if len(images) > 0 {
		opener := &imageOpener{ctx: ctx, c: c}
		closers = append(closers, opener.Close) // closed last: closeAll runs backwards
		for _, src := range images {
			img, err := opener.open(src, true)
			if err != nil {
				return fail(err)
			}
			closers = append(closers, img.Close)
			var dev nbd.Device = img
			if path := c.String("record-trace"); path != "" {
				td := &tracingDevice{Image: img}
				dev = td
				closers = append(closers, func() error { // runs before img.Close
					err := td.writeTrace(path)
					if err == nil {
						logger(ctx).Info().Str("file", path).Msg("trace written")
					}
					return err
				})
			}
			id, name, err := src.identity()
			if err != nil {
				return fail(err)
			}
			if len(names) > 0 {
				name, names = names[0], names[1:]
			}
			exports = append(exports, nbd.Export{
				Name:        name,
				Description: "RAFS image " + strings.TrimPrefix(strings.TrimPrefix(id, "rafsnbd:image:"), "rafsnbd:ref:"),
				Device:      dev,
				BlockSize:   img.BlockSize(),
			})
			sources = append(sources, id)
		}
	}
	if len(names) > len(disks) {
		return fail(fmt.Errorf("too many --name flags: one per image and --disk"))
	}
	for i, path := range disks {
		name := strings.TrimSuffix(filepath.Base(path), filepath.Ext(path))
		if i < len(names) {
			name = names[i]
		}
		exp, closeDisk, err := openDiskExport(path, name)
		if err != nil {
			return fail(err)
		}
		closers = append(closers, closeDisk)
		exports = append(exports, exp)
		sources = append(sources, path)
	}

	if len(exports) == 0 {
		return fail(errors.New("nothing to serve: give -B BOOTSTRAP -D BLOBDIR, or --disk FILE"))
	}
	seen := map[string]string{}
	for i, e := range exports {
		if prev, dup := seen[e.Name]; dup {
			return fail(fmt.Errorf("export name %q used by both %s and %s; give distinct --name flags", e.Name, prev, sources[i]))
		}
		seen[e.Name] = sources[i]
	}
	return exports, closeAll, nil
}

// openDiskExport opens a flat disk file as an export. The preferred block
// size advertised to clients is the EROFS block size when the file holds an
// EROFS superblock.
func openDiskExport(path, name string) (nbd.Export, func() error, error) {
	d, err := openDisk(path)
	if err != nil {
		return nbd.Export{}, nil, err
	}
	return nbd.Export{
		Name:        name,
		Description: filepath.Base(path),
		Device:      d,
		BlockSize:   uint32(d.blockSize), // 0 (no EROFS superblock) means 4096
	}, d.Close, nil
}

// parseListen splits unix:PATH or tcp:HOST:PORT and refuses non-loopback TCP
// addresses unless allowRemote.
func parseListen(ctx context.Context, spec string, allowRemote bool) (network, address string, err error) {
	network, address, ok := strings.Cut(spec, ":")
	if !ok || address == "" {
		return "", "", fmt.Errorf("--listen %q: want unix:PATH or tcp:HOST:PORT", spec)
	}
	switch network {
	case "unix":
		// Absolute, so that the URIs printed work from any directory.
		abs, err := filepath.Abs(address)
		if err != nil {
			return "", "", fmt.Errorf("--listen %q: %w", spec, err)
		}
		return network, abs, nil
	case "tcp":
		host, _, err := net.SplitHostPort(address)
		if err != nil {
			return "", "", fmt.Errorf("--listen %q: %w", spec, err)
		}
		if allowRemote {
			return network, address, nil
		}
		if err := requireLoopback(ctx, host); err != nil {
			return "", "", fmt.Errorf("--listen %q: %w; NBD has no authentication or encryption here, pass --allow-remote to serve other hosts", spec, err)
		}
		return network, address, nil
	default:
		return "", "", fmt.Errorf("--listen %q: unknown network %q, want unix or tcp", spec, network)
	}
}

func requireLoopback(ctx context.Context, host string) error {
	if host == "" {
		return errors.New("an empty host listens on every interface")
	}
	var ips []net.IP
	if ip := net.ParseIP(host); ip != nil {
		ips = []net.IP{ip}
	} else {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		addrs, err := net.DefaultResolver.LookupIPAddr(ctx, host)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			ips = append(ips, a.IP)
		}
	}
	for _, ip := range ips {
		if !ip.IsLoopback() {
			return fmt.Errorf("%s is not a loopback address", ip)
		}
	}
	return nil
}

// listen binds the address. A unix socket file left behind by a server that
// is gone is replaced; one a live server answers on is not.
func listen(network, address string) (net.Listener, error) {
	if network == "unix" {
		if st, err := os.Lstat(address); err == nil {
			if st.Mode()&os.ModeSocket == 0 {
				return nil, fmt.Errorf("listen %s: exists and is not a socket", address)
			}
			if conn, err := net.DialTimeout("unix", address, time.Second); err == nil {
				conn.Close()
				return nil, fmt.Errorf("listen %s: another server is listening there", address)
			}
			if err := os.Remove(address); err != nil {
				return nil, fmt.Errorf("listen %s: removing stale socket: %w", address, err)
			}
		}
	}
	l, err := net.Listen(network, address)
	if err != nil {
		return nil, err
	}
	return l, nil
}

// exportURI is the NBD URI (as libnbd and qemu read it) of one export.
func exportURI(addr net.Addr, name string) string {
	if addr.Network() == "unix" {
		// The socket path is absolute (parseListen made it so) and
		// percent-encoded but for its slashes, so that a space, '#' or '&'
		// in it survives libnbd's and qemu's URI parsers.
		return "nbd+unix:///" + url.PathEscape(name) + "?socket=" + escapeSocketPath(addr.String())
	}
	host, port, err := net.SplitHostPort(addr.String())
	if ip := net.ParseIP(host); err == nil && ip != nil && ip.IsUnspecified() {
		// Listening on every address: "[::]" connects nowhere, the host's
		// name does (from other hosts, which is why one listens so).
		if name, err := os.Hostname(); err == nil && name != "" {
			host = name
		}
	}
	return (&url.URL{Scheme: "nbd", Host: net.JoinHostPort(host, port), Path: "/" + name}).String()
}

// escapeSocketPath percent-encodes every byte of a path but RFC 3986's
// unreserved characters and '/'.
func escapeSocketPath(p string) string {
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		switch c := p[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', strings.IndexByte("-._~/", c) >= 0:
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}
