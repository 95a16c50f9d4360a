# plot.gp: charts of one sweep (ws.sweep writes the data file and calls this).
#
#   gnuplot -e 'datafile="r.dat"; outfile="r.png"; fmt="png"; title="sleep"; npoints=8' bench/plot.gp
#
# Data columns (one line per configuration, see ws.sweep.charts):
#   1 label  2-6 step ms median/min/max/q1/q3 (steps 2..N)  7 first step ms
#   8 peak device MB  9 peak host MB  10 MB sent per step
# Top: time per step, median with min/max bars, and the first step (which
# always sends the base). Bottom: peak device and host memory.

if (!exists("datafile")) datafile = "sweep.dat"
if (!exists("outfile")) outfile = "sweep.png"
if (!exists("fmt")) fmt = "png"
if (!exists("title")) title = "sweep"
if (!exists("npoints")) npoints = 8

width = npoints > 12 ? 60 * npoints + 360 : 1060
if (fmt eq "svg") {
    set terminal svg size width, 800 dynamic font "sans,11" background "white"
} else {
    set terminal pngcairo size width, 800 font "sans,9" background "white"
}
set output outfile
set termoption noenhanced

set multiplot layout 2, 1 title title font ",12"
set style fill solid 0.75 border -1
set grid ytics lc rgb "#dddddd"
set xtics rotate by 30 right nomirror noenhanced
set key outside right top vertical noenhanced samplen 2
set xrange [-0.6 : npoints - 0.4]
set yrange [0 : *]
set boxwidth 0.6
set bmargin 8
set lmargin 18

set ylabel "ms per step"
plot datafile using 0:2:xtic(1) with boxes lc rgb "#4878a8" title "steady step (median)", \
     ''       using 0:3:(0):($4 - $3) with vectors nohead lw 1.5 lc rgb "#222222" title "min / max", \
     ''       using 0:7 with points pt 7 ps 0.8 lc rgb "#c0504d" title "first step"

set ylabel "peak memory (MB)"
set boxwidth 0.35
plot datafile using ($0 - 0.19):8:xtic(1) with boxes lc rgb "#6a9a5b" title "device (wshost held, peak)", \
     ''       using ($0 + 0.19):9 with boxes lc rgb "#d9a441" title "host (peak RSS)"

unset multiplot
unset output
