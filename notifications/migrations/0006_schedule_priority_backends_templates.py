# Scheduling, expiry, cancel, priority, named backends and templates. The outbox's new
# index is built CONCURRENTLY (a large outbox keeps taking writes meanwhile), which
# cannot run inside a transaction, hence atomic = False.

import django.db.models.functions.datetime
from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ('notifications', '0005_search_indexes'),
    ]

    operations = [
        migrations.CreateModel(
            name='EmailTemplate',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(help_text='What notify(template=...) names, e.g. "billing/invoice".', max_length=200)),
                ('language', models.CharField(blank=True, default='', help_text='Empty: the default variant.', max_length=35)),
                ('subject', models.TextField(help_text='Django template language; rendered without HTML escaping.')),
                ('body', models.TextField(blank=True, default='', help_text='The text body; rendered without HTML escaping.')),
                ('html_body', models.TextField(blank=True, default='', help_text='The HTML body (optional); escaped as HTML.')),
                ('sample_context', models.JSONField(blank=True, default=dict, help_text="The context the admin's preview renders.")),
                ('created_at', models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
                ('updated_at', models.DateTimeField(auto_now=True)),
            ],
            options={
                'ordering': ['name', 'language'],
            },
        ),
        migrations.CreateModel(
            name='RateBucket',
            fields=[
                ('name', models.CharField(max_length=100, primary_key=True, serialize=False)),
                ('next_at', models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
            ],
        ),
        migrations.AddField(
            model_name='notification',
            name='backend',
            field=models.CharField(blank=True, db_default='', help_text='Its email backend (NOTIFICATIONS_BACKENDS).', max_length=100),
        ),
        migrations.AddField(
            model_name='notification',
            name='expires_at',
            field=models.DateTimeField(blank=True, help_text='Never sent after this time.', null=True),
        ),
        migrations.AddField(
            model_name='notification',
            name='language',
            field=models.CharField(blank=True, db_default='', help_text="The template's language.", max_length=35),
        ),
        migrations.AddField(
            model_name='notification',
            name='priority',
            field=models.CharField(choices=[('normal', 'normal'), ('high', 'high')], db_default='normal', max_length=8),
        ),
        migrations.AddField(
            model_name='notification',
            name='send_at',
            field=models.DateTimeField(blank=True, help_text='Not sent before this time.', null=True),
        ),
        migrations.AddField(
            model_name='notification',
            name='template',
            field=models.CharField(blank=True, db_default='', help_text='The template its content was rendered from.', max_length=200),
        ),
        migrations.AddField(
            model_name='outboxmessage',
            name='priority',
            field=models.CharField(choices=[('normal', 'normal'), ('high', 'high')], db_default='normal', max_length=8),
        ),
        migrations.AlterField(
            model_name='notification',
            name='status',
            field=models.CharField(choices=[('created', 'created'), ('published', 'published'), ('sending', 'sending'), ('retrying', 'retrying'), ('sent', 'sent'), ('failed', 'failed'), ('ambiguous', 'ambiguous (held)'), ('scheduled', 'scheduled'), ('expired', 'expired'), ('cancelled', 'cancelled')], db_default='created', max_length=16),
        ),
        migrations.AlterField(
            model_name='outboxmessage',
            name='due_at',
            field=models.DateTimeField(blank=True, db_default=django.db.models.functions.datetime.Now(), help_text='Not published before this time.', null=True),
        ),
        migrations.AlterField(
            model_name='sentemail',
            name='state',
            field=models.CharField(choices=[('claimed', 'claimed'), ('released', 'released (will retry)'), ('sent', 'sent'), ('failed', 'failed'), ('held', 'held (ambiguous)'), ('expired', 'expired'), ('cancelled', 'cancelled')], default='claimed', max_length=16),
        ),
        # Unpublished rows of earlier releases were due at once when due_at was empty;
        # the relay's claim now reads due_at alone (the index below orders by it).
        migrations.RunSQL(
            'UPDATE "notifications_outboxmessage" SET "due_at" = "created_at" '
            'WHERE "published_at" IS NULL AND "due_at" IS NULL',
            migrations.RunSQL.noop,
        ),
        AddIndexConcurrently(
            model_name='outboxmessage',
            index=models.Index(condition=models.Q(('published_at__isnull', True)), fields=['priority', 'due_at', 'id'], name='notifications_outbox_due'),
        ),
        RemoveIndexConcurrently(
            model_name='outboxmessage',
            name='notifications_outbox_pending',
        ),
        migrations.AddConstraint(
            model_name='emailtemplate',
            constraint=models.UniqueConstraint(fields=('name', 'language'), name='notifications_template_name_language_uniq'),
        ),
    ]
