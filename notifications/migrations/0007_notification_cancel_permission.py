# The admin's "Cancel selected notifications" action needs a permission of its own
# (notifications.cancel_notification), beside resolve_ambiguous.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('notifications', '0006_schedule_priority_backends_templates'),
    ]

    operations = [
        migrations.AlterModelOptions(
            name='notification',
            options={'ordering': ['-id'], 'permissions': [('resolve_ambiguous', 'Can resend or close held ambiguous notifications'), ('cancel_notification', 'Can cancel notifications not yet sent')]},
        ),
    ]
